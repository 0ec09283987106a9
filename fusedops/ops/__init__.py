"""The fusedops::* torch.library ops, one module per family."""
from .add import add_, add_op, foreach_add_, foreach_add_op

__all__ = ["add_", "add_op", "foreach_add_", "foreach_add_op"]
from . import batchnorm  # noqa: F401  (fusedops::bn_stats, bn_act_apply, bn_act_backward)
