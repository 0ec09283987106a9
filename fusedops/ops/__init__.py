"""The fusedops::* torch.library ops, one module per family."""
from .add import add_, add_op, foreach_add_, foreach_add_op

__all__ = ["add_", "add_op", "foreach_add_", "foreach_add_op"]
from .optim8bit import blockwise_dequantize, blockwise_quantize, optimizer_step_8bit_  # noqa: E402
