"""Drop-in torch.nn modules backed by the fusedops ops.

ConvBNAct2d / FoldedConvAct2d: Conv2d + BatchNorm2d (+ activation), see fusedops.nn_convbn.

LayerNormAct / RMSNormAct: act(LayerNorm(x)) / act(RMSNorm(x)) in one kernel, forward
and backward. AddLayerNorm / AddRMSNorm: the pre-norm residual pattern
`s = x + residual; y = act(norm(s))`, forward(x, residual) -> (y, s); with inplace=True
s is written into the residual buffer. Constructor arguments and state_dict keys
(`weight`, `bias`) are those of nn.LayerNorm / nn.RMSNorm, so eager checkpoints load.
Only the last dim is normalised (normalized_shape an int or a 1-tuple).
autocast_output=True: under autocast, y in the autocast dtype (for a norm whose output
only feeds layers that cast it to that dtype, e.g. nn.Linear: the same values, half the
bytes; see the class attribute's comment).

fusedops.convert(model) uses the rules registered at the bottom: nn.LayerNorm/nn.RMSNorm
followed by ReLU/GELU/SiLU inside an nn.Sequential become one fused module (the
activation's slot becomes nn.Identity), and a plain LayerNorm/RMSNorm becomes the fused
module with the identity activation.
"""
from __future__ import annotations

import torch
from torch import nn

from . import converter
from .ops import norm as _norm

from .nn_convbn import ConvBNAct2d, FoldedConvAct2d  # noqa: E402  (Conv2d + BatchNorm2d + activation)

__all__ = ["AddLayerNorm", "AddRMSNorm", "ConvBNAct2d", "FoldedConvAct2d", "LayerNormAct", "RMSNormAct",
           "activation_name"]


def activation_name(act: nn.Module | None) -> str | None:
    """The fusedops activation name of an activation module, or None if unsupported."""
    if act is None or type(act) is nn.Identity:
        return "identity"
    if type(act) is nn.ReLU:
        return "relu"
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if type(act) is nn.SiLU:
        return "silu"
    return None


def _hidden(normalized_shape) -> int:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"fusedops.nn: only the last dim can be normalised; normalized_shape={shape} has "
                         f"{len(shape)} dims")
    return int(shape[0])


def _check_activation(activation: str) -> str:
    if activation not in _norm.ACTIVATIONS:
        raise ValueError(f"fusedops.nn: unknown activation {activation!r}; choose one of "
                         f"{', '.join(_norm.ACTIVATIONS)}")
    return activation


# The dtypes autocast casts (it leaves fp64 alone).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


class _NormBase(nn.Module):
    _rms = False
    # Under autocast, y in the autocast dtype instead of eager's (fp32 for LayerNorm under
    # CUDA autocast, x's dtype otherwise): right where every consumer of y casts it to that
    # dtype anyway, as nn.Linear does under autocast (then the values are eager's: y is
    # computed in fp32 and rounded once either way), and it saves writing an fp32 y, the
    # consumer's cast kernel, and their backward passes. fusedops.convert sets it where
    # torch.fx proves that a norm's output feeds only nn.Linear calls (converter_norm).
    # (A class attribute: modules pickled before it existed load with it off.)
    autocast_output = False

    def __init__(self, normalized_shape, eps, elementwise_affine, bias, device, dtype, activation,
                 autocast_output=False):
        super().__init__()
        self.autocast_output = bool(autocast_output)
        n = _hidden(normalized_shape)
        self.normalized_shape = (n,)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.activation = _check_activation(activation)
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(n, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(n, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"activation={self.activation!r}" + (", autocast_output=True" if self.autocast_output else ""))

    def _out_dtype(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """y's dtype: the autocast dtype with autocast_output under autocast (for the dtypes
        autocast casts: the norm input's, x + residual's when given), else None (the
        functions' own choice, eager's)."""
        if not self.autocast_output:
            return None
        dt = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        if dt in _AUTOCAST_ELIGIBLE and torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return None

    @classmethod
    def from_modules(cls, norm: nn.Module, act: nn.Module | None = None, **kwargs):
        """Build from an nn.LayerNorm / nn.RMSNorm and an activation module (or None). The
        parameters are shared, not copied (an optimizer holding them keeps working)."""
        want = nn.RMSNorm if cls._rms else nn.LayerNorm
        if not isinstance(norm, want):
            raise TypeError(f"{cls.__name__}.from_modules: norm must be an nn.{want.__name__}, got "
                            f"{type(norm).__name__}")
        name = activation_name(act)
        if name is None:
            raise ValueError(f"{cls.__name__}.from_modules: unsupported activation {type(act).__name__}; "
                             "supported: ReLU, GELU (none/tanh), SiLU, Identity")
        weight = norm.weight
        factory = {"device": weight.device if weight is not None else None,
                   "dtype": weight.dtype if weight is not None else None}
        if cls._rms:
            new = cls(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                      activation=name, **factory, **kwargs)
        else:
            new = cls(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                      bias=norm.bias is not None, activation=name, **factory, **kwargs)
        if norm.weight is not None:
            new.weight = norm.weight
        if not cls._rms and norm.bias is not None:
            new.bias = norm.bias
        new.train(norm.training)
        return new


class LayerNormAct(_NormBase):
    """act(nn.LayerNorm(x)); arguments as nn.LayerNorm plus `activation` and
    `autocast_output` (see _NormBase)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, activation: str = "identity", autocast_output: bool = False):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype, activation, autocast_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _norm.layer_norm_act(x, self.weight, self.bias, self.eps, self.activation,
                                    out_dtype=self._out_dtype(x))


class RMSNormAct(_NormBase):
    """act(nn.RMSNorm(x)); arguments as nn.RMSNorm plus `activation` (eps=None: the
    machine epsilon of the compute dtype, as nn.RMSNorm: fp32's for fp16/bf16/fp32 input)."""
    _rms = True

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None,
                 dtype=None, activation: str = "identity", autocast_output: bool = False):
        super().__init__(normalized_shape, eps, elementwise_affine, False, device, dtype, activation, autocast_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _norm.rms_norm_act(x, self.weight, self.eps, self.activation, out_dtype=self._out_dtype(x))


class AddLayerNorm(_NormBase):
    """forward(x, residual) -> (y, s): s = x + residual, y = act(LayerNorm(s)).
    inplace=True writes s into `residual` (and returns it as s)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, activation: str = "identity", inplace: bool = False,
                 autocast_output: bool = False):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype, activation, autocast_output)
        self.inplace = inplace

    def forward(self, x: torch.Tensor, residual: torch.Tensor):
        return _norm.add_layer_norm_act(x, residual, self.weight, self.bias, self.eps, self.activation,
                                        inplace=self.inplace, out_dtype=self._out_dtype(x, residual))


class AddRMSNorm(_NormBase):
    """forward(x, residual) -> (y, s): s = x + residual, y = act(RMSNorm(s))."""
    _rms = True

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None,
                 dtype=None, activation: str = "identity", inplace: bool = False, autocast_output: bool = False):
        super().__init__(normalized_shape, eps, elementwise_affine, False, device, dtype, activation, autocast_output)
        self.inplace = inplace

    def forward(self, x: torch.Tensor, residual: torch.Tensor):
        return _norm.add_rms_norm_act(x, residual, self.weight, self.eps, self.activation, inplace=self.inplace,
                                      out_dtype=self._out_dtype(x, residual))


# ---- converter rules -------------------------------------------------------------------------

def _fusable_norm(m: nn.Module) -> type | None:
    """The fused class for a plain nn.LayerNorm / nn.RMSNorm over the last dim."""
    if type(m) is nn.LayerNorm and len(m.normalized_shape) == 1:
        return LayerNormAct
    if type(m) is nn.RMSNorm and len(m.normalized_shape) == 1:
        return RMSNormAct
    return None


def _chain(mods, i):
    cls = _fusable_norm(mods[i])
    if cls is None or i + 1 >= len(mods):
        return None
    act = mods[i + 1]
    if type(act) is nn.Identity or activation_name(act) is None:
        return None
    return 2, cls.from_modules(mods[i], act)


def _single(m):
    cls = _fusable_norm(m)
    return None if cls is None else cls.from_modules(m, None)


converter.register_rule(converter.Rule("norm-activation", chain=_chain))
converter.register_rule(converter.Rule("norm", single=_single))
