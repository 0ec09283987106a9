"""The fusedops::* torch.library ops, one module per family."""
from . import batchnorm  # noqa: F401  (fusedops::bn_stats, bn_act_apply, bn_act_backward)
from . import convbn  # noqa: F401  (fusedops::conv_bn_act_train and its backward)
from .add import add_, add_op, foreach_add_, foreach_add_op
from .norm import add_layer_norm_act, add_rms_norm_act, layer_norm_act, rms_norm_act
from .optim8bit import blockwise_dequantize, blockwise_quantize, optimizer_step_8bit_

__all__ = ["add_", "add_layer_norm_act", "add_op", "add_rms_norm_act", "blockwise_dequantize", "blockwise_quantize",
           "foreach_add_", "foreach_add_op", "layer_norm_act", "optimizer_step_8bit_", "rms_norm_act"]
