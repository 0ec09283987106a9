"""The fusedops::* torch.library ops, one module per family."""
from .add import add_, add_op, foreach_add_, foreach_add_op

__all__ = ["add_", "add_op", "foreach_add_", "foreach_add_op"]
from .norm import add_layer_norm_act, add_rms_norm_act, layer_norm_act, rms_norm_act  # noqa: E402

__all__ += ["add_layer_norm_act", "add_rms_norm_act", "layer_norm_act", "rms_norm_act"]
