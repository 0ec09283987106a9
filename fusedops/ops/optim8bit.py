"""8-bit optimizer ops: blockwise quantization and the multi-tensor optimizer step.

- `blockwise_quantize(x, code) -> (codes uint8, absmax fp32)` and
  `blockwise_dequantize(codes, absmax, code) -> fp32`: bitsandbytes' blockwise dynamic
  quantization (block 256, nearest code, ties to the lower code, bnb's sign rule). These
  run the eager definition in fusedops.reference on every device (vectorised torch ops);
  the optimizer step does its own (de)quantization inside its kernel.
- `optimizer_step_8bit_(params, grads, state1, absmax1, state2, absmax2, kind, lr, beta1,
  beta2, eps, weight_decay, step, first, nesterov)`: one step of AdamW / Adam / Lion / SGD
  over every tensor of the lists in ONE launch (per call: the lists share a device and a
  param dtype). States are uint8 codes + fp32 absmax per 256 elements (signed dynamic map
  for the first state, unsigned for the second), or fp32 with an empty absmax (32-bit
  states). lr and step are plain runtime arguments of every kernel: changing them
  recompiles nothing, and nothing in the step synchronises with the host.

Backends: Triton and CUDA C++ on CUDA tensors, C++ on CPU tensors, reference anywhere.
The C++ CPU and CUDA C++ kernels and the reference do every fp32 operation separately
rounded in the same order (csrc/optim8bit.h), so they agree bit for bit; the Triton
kernel under the interpreter does too. Compiled Triton on a GPU may contract a multiply
and an add into an fma: its fp32 intermediates can then differ in the last bit, which
moves a code by one step where a value sits on a rounding midpoint (rare elements).
"""
from __future__ import annotations

import math

import torch

from .. import _native, _triton, _validate, reference
from .._backend import Kernels
from ._library import define, not_differentiable

QUANT_OP, DEQUANT_OP, STEP_OP = "blockwise_quantize", "blockwise_dequantize", "optimizer_step_8bit_"
KINDS = reference.OPTIM_KINDS
_KIND_ID = {k: i for i, k in enumerate(KINDS)}
TWO_STATE = ("adamw", "adam")

# Default on CUDA tensors: the CUDA C++ kernel. H100, 2026-11-22, 96 tensors / 201M params:
# AdamW8bit fp32 params 3.35 ms (Triton 4.56), bf16 params 2.00 ms (Triton 4.56), Lion
# 2.57 (2.74), SGD 2.65 (2.93); it is also the CUDA-graph-capturable one (bench/NOTES.md).
_step = Kernels(STEP_OP, cuda_default="cuda")

# ---- quantization maps (constants, cached per device) ------------------------------------

_qmaps: dict = {}


def signed_map() -> torch.Tensor:
    """The signed dynamic map (first moments): see fusedops.reference.dynamic_map."""
    return reference.dynamic_map(True)


def unsigned_map() -> torch.Tensor:
    """The unsigned dynamic map (second moments): see fusedops.reference.dynamic_map."""
    return reference.dynamic_map(False)


# Bucket tables of the kernels' quantizer (csrc/optim8bit.h quantize): the bits of |x| >> 16
# (exponent and the top 7 mantissa bits) select a bucket; buckets below exponent 2^-23 (no
# midpoint lies there) share bucket 0, and everything from 1.0 up the last one.
BUCKET_SHIFT = 16
BUCKET_BASE = (104 << 7) - 1          # key of the bucket below 2^-23 (bucket 0)
BUCKETS = (127 << 7) - BUCKET_BASE + 1  # 2946 buckets per sign
MANT = 0x7FFFFF
SIGNED_CODE, SIGNED_MIDS, UNSIGNED_CODE, UNSIGNED_MIDS = 0, 256, 512, 768
SIGNED_TABLE, UNSIGNED_TABLE = 1024, 1024 + 2 * BUCKETS
QMAPS_NUMEL = 1024 + 4 * BUCKETS


def bucket_table(code: torch.Tensor, signed: bool) -> torch.Tensor:
    """int32 [2 * BUCKETS] for the map `code`: entries (base << 23) | thr for x >= 0 (first
    half; -0.0 counts as >= 0) and for x < 0 (second half). The code of x is
    base + (mantissa' > thr), mantissa' = the 23 mantissa bits of x, complemented for x < 0:

    - x >= 0 in bucket [lo, hi): base = number of midpoints < lo; a bucket holds at most one
      midpoint (checked here), and a midpoint mid in it is < x iff its mantissa is below
      x's (same exponent and top bits): thr = mantissa(mid), or 0x7FFFFF (never) if none.
    - x < 0, |x| in [lo, hi), x in (-hi, -lo]: base = number of midpoints <= -hi; the
      midpoint -b with b in [lo, hi) is < x iff b > |x|: thr = complemented mantissa(b).
      bnb's sign rule (a negative x never takes the code of 0) is folded in: codes are
      capped at the last negative code.

    So the code is exactly "number of midpoints strictly below x" (+ the sign rule) for
    every float x, not only in [-1, 1] (tests/test_optim8bit.py checks it against a brute
    force search)."""
    import numpy as np

    mids = reference.code_midpoints(code).numpy().astype(np.float32)
    assert np.all(mids[1:] > mids[:-1])
    keys = np.arange(BUCKETS, dtype=np.int64) + BUCKET_BASE
    lo = (keys << BUCKET_SHIFT).astype(np.uint32).view(np.float32).astype(np.float64)
    lo[0] = 0.0
    hi = np.append(lo[1:], np.inf)
    mids64 = mids.astype(np.float64)
    mbits = mids.view(np.uint32).astype(np.int64) & MANT
    # x >= 0
    base = np.searchsorted(mids64, lo, side="left")
    cnt = np.searchsorted(mids64, hi, side="left") - base
    assert cnt.max() <= 1, "a bucket holds two midpoints: the map needs finer buckets"
    thr = np.where(cnt == 1, mbits[np.minimum(base, 254)], MANT)
    pos = (base << 23) | thr
    # x < 0
    nbase = np.searchsorted(mids64, -hi, side="right")
    ncnt = np.searchsorted(mids64, -lo, side="right") - nbase
    ncnt[0] = np.searchsorted(mids64, 0.0, side="left") - nbase[0]  # (-hi, 0): -0.0 is in the first half
    assert ncnt.max() <= 1, "a bucket holds two midpoints: the map needs finer buckets"
    # the first bucket spans exponents and the last one everything from 1.0 up: no midpoints
    assert cnt[0] == cnt[-1] == ncnt[0] == ncnt[-1] == 0
    nthr = np.where(ncnt == 1, MANT ^ mbits[np.minimum(nbase, 254)], MANT)
    if signed:  # sign rule: codes of negative x stop at the last negative code (126)
        zero = int(np.searchsorted(code.numpy(), 0.0))
        nthr = np.where(nbase + ncnt >= zero, MANT, nthr)
        nbase = np.minimum(nbase, zero - 1)
    neg = (nbase << 23) | nthr
    return torch.from_numpy(np.concatenate([pos, neg]).astype(np.int32))


def qmaps(device: torch.device) -> torch.Tensor:
    """fp32 [QMAPS_NUMEL] on `device`, read by every kernel of the step: signed code, its 255
    midpoints (+1 padding), unsigned code, its midpoints (+1 padding), then the bucket
    tables of the signed and of the unsigned map (bucket_table; int32 entries stored as
    their bits — copied, never computed with). Built once per device."""
    device = torch.device(device)
    key = (device.type, device.index)
    t = _qmaps.get(key)
    if t is None:
        rows, tables = [], []
        for signed, code in ((True, signed_map()), (False, unsigned_map())):
            mids = reference.code_midpoints(code)
            rows += [code, torch.cat([mids, torch.tensor([2.0])])]
            tables.append(bucket_table(code, signed).view(torch.float32))
        t = torch.cat(rows + tables).contiguous()
        assert t.numel() == QMAPS_NUMEL
        t = _qmaps[key] = t.to(device)
    return t


def table_quantize(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """The kernels' quantizer in torch (int64 codes of the fp32 x, already normalised):
    bucket_table lookups. Equal to reference._nearest_code for every float x."""
    tab = qmaps(x.device)[SIGNED_TABLE if signed else UNSIGNED_TABLE:][:2 * BUCKETS].view(torch.int32).long()
    u = x.float().contiguous().view(torch.int32).long() & 0x7FFFFFFF
    neg = x < 0
    k = ((u >> BUCKET_SHIFT) - BUCKET_BASE).clamp(0, BUCKETS - 1) + neg.long() * BUCKETS
    e = tab[k]
    mant = (u & MANT) ^ torch.where(neg, MANT, 0)
    return (e >> 23) + (mant > (e & MANT)).long()


# ---- blockwise quantize / dequantize -----------------------------------------------------

def _check_code(code, op):
    _validate.tensor(code, "code", op)
    if code.dtype != torch.float32 or code.shape != (256,):
        raise ValueError(f"fusedops.{op}: code must be a float32 tensor of shape (256,) (a sorted "
                         f"quantization map), got {code.dtype} {tuple(code.shape)}")


def _check_quantize(x, code):
    _validate.tensor(x, "x", QUANT_OP)
    _validate.floating(x, "x", QUANT_OP)
    _check_code(code, QUANT_OP)
    _validate.same_device(x, "x", code, "code", QUANT_OP)


def _quantize_impl(x, code):
    _check_quantize(x, code)
    return reference.blockwise_quantize(x, code)


def _quantize_fake(x, code):
    _check_quantize(x, code)
    blocks = -(-x.numel() // reference.QUANT_BLOCK)
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((blocks,), dtype=torch.float32)


quantize_op = define(f"{QUANT_OP}(Tensor x, Tensor code) -> (Tensor, Tensor)", _quantize_impl, _quantize_fake)


def _check_dequantize(codes, absmax, code):
    _validate.tensor(codes, "codes", DEQUANT_OP)
    _validate.tensor(absmax, "absmax", DEQUANT_OP)
    _check_code(code, DEQUANT_OP)
    if codes.dtype != torch.uint8:
        raise TypeError(f"fusedops.{DEQUANT_OP}: codes must be uint8, got {codes.dtype}")
    if absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise TypeError(f"fusedops.{DEQUANT_OP}: absmax must be a 1-D float32 tensor, got {absmax.dtype} "
                        f"{tuple(absmax.shape)}")
    blocks = -(-codes.numel() // reference.QUANT_BLOCK)
    if absmax.numel() != blocks:
        raise ValueError(f"fusedops.{DEQUANT_OP}: absmax has {absmax.numel()} elements but codes of "
                         f"{codes.numel()} elements need {blocks} (one per 256)")
    _validate.same_device(codes, "codes", absmax, "absmax", DEQUANT_OP)
    _validate.same_device(codes, "codes", code, "code", DEQUANT_OP)


def _dequantize_impl(codes, absmax, code):
    _check_dequantize(codes, absmax, code)
    return reference.blockwise_dequantize(codes, absmax, code)


def _dequantize_fake(codes, absmax, code):
    _check_dequantize(codes, absmax, code)
    return codes.new_empty(codes.shape, dtype=torch.float32)


dequantize_op = define(f"{DEQUANT_OP}(Tensor codes, Tensor absmax, Tensor code) -> Tensor", _dequantize_impl,
                       _dequantize_fake)
for _op in (quantize_op, dequantize_op):
    not_differentiable(_op)


def blockwise_quantize(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of x with the 256-entry sorted map `code` (e.g. signed_map()): per
    block of 256 elements of the flattened x, absmax = max |x| (fp32 [ceil(n/256)]) and
    codes = index of the nearest code to x / absmax (uint8, shape of x). A value exactly
    on a midpoint between two codes (fp32 midpoints, reference.code_midpoints) takes the
    lower code; with a signed map a negative value never rounds up to 0 (it takes the
    smallest negative code). x must be finite."""
    return quantize_op(x, code)


def blockwise_dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """code[codes] * absmax[block of the element], fp32 with the shape of codes."""
    return dequantize_op(codes, absmax, code)


# ---- the optimizer step ------------------------------------------------------------------

def _check_step(params, grads, state1, absmax1, state2, absmax2, kind, memory=True, lists_only=False):
    """Every check of the step's arguments (each error names the argument). lists_only: the
    kind and the list lengths alone (what the extension's own check cannot name)."""
    op = STEP_OP
    if kind not in KINDS:
        raise ValueError(f"fusedops.{op}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    two = kind in TWO_STATE
    n = len(params)
    lists = [("grads", grads), ("state1", state1), ("absmax1", absmax1)]
    if two:
        lists += [("state2", state2), ("absmax2", absmax2)]
    elif state2 or absmax2:
        raise ValueError(f"fusedops.{op}: kind {kind!r} has one state; state2 and absmax2 must be empty")
    for name, ts in lists:
        if len(ts) != n:
            raise ValueError(f"fusedops.{op}: {name} has {len(ts)} tensors but params has {n}")
    if n == 0 or lists_only:
        return
    dev, dtype = params[0].device, params[0].dtype
    for i, p in enumerate(params):
        _validate.tensor(p, f"params[{i}]", op)
        g = _validate.tensor(grads[i], f"grads[{i}]", op)
        if p.dtype not in _validate.KERNEL_DTYPES:
            raise TypeError(f"fusedops.{op}: params[{i}] must be float32, float16 or bfloat16, got {p.dtype}")
        if p.dtype != dtype or g.dtype != dtype:
            raise TypeError(f"fusedops.{op}: params[{i}] and grads[{i}] must have the dtype of params[0] "
                            f"({dtype}), got {p.dtype} / {g.dtype}")
        if p.device != dev or g.device != dev:
            raise ValueError(f"fusedops.{op}: params[{i}] and grads[{i}] must be on {dev}, got {p.device} / "
                             f"{g.device}")
        if g.shape != p.shape:
            raise ValueError(f"fusedops.{op}: grads[{i}] has shape {tuple(g.shape)} but params[{i}] has "
                             f"{tuple(p.shape)}")
        if memory and not p.is_contiguous():
            raise ValueError(f"fusedops.{op}: params[{i}] must be contiguous")
        blocks = -(-p.numel() // reference.QUANT_BLOCK)
        for sname, aname, sl, al in (("state1", "absmax1", state1, absmax1), ("state2", "absmax2", state2, absmax2)):
            if sname == "state2" and not two:
                continue
            s = _validate.tensor(sl[i], f"{sname}[{i}]", op)
            a = _validate.tensor(al[i], f"{aname}[{i}]", op)
            if s.device != dev or a.device != dev:
                raise ValueError(f"fusedops.{op}: {sname}[{i}] and {aname}[{i}] must be on {dev}")
            if s.numel() != p.numel():
                raise ValueError(f"fusedops.{op}: {sname}[{i}] has {s.numel()} elements but params[{i}] has "
                                 f"{p.numel()}")
            if memory and not (s.is_contiguous() and a.is_contiguous()):
                raise ValueError(f"fusedops.{op}: {sname}[{i}] and {aname}[{i}] must be contiguous")
            if a.dtype != torch.float32:
                raise TypeError(f"fusedops.{op}: {aname}[{i}] must be float32, got {a.dtype}")
            if s.dtype == torch.uint8:
                if a.numel() != blocks:
                    raise ValueError(f"fusedops.{op}: {aname}[{i}] must have {blocks} elements (one per 256 of "
                                     f"params[{i}]), got {a.numel()}")
            elif s.dtype == torch.float32:
                if a.numel() != 0:
                    raise ValueError(f"fusedops.{op}: {aname}[{i}] must be empty for a float32 (32-bit) "
                                     f"{sname}[{i}]")
            else:
                raise TypeError(f"fusedops.{op}: {sname}[{i}] must be uint8 (8-bit) or float32 (32-bit), "
                                f"got {s.dtype}")
    if memory and dev.type != "meta":  # meta tensors have no memory (every data_ptr is 0)
        names = ["params", "state1", "absmax1"] + (["state2", "absmax2"] if two else [])
        written = list(params) + list(state1) + list(absmax1) + (list(state2) + list(absmax2) if two else [])
        if _validate.certain_disjoint_writes(written, list(grads), op, "params and states", "grads",
                                             x_label=lambda k: f"{names[k // n]}[{k % n}]"):
            # a strided grad meets a written tensor: refuse as before (one launch)
            _validate.disjoint_writes(written, list(grads), op, "params and states", "grads")


def _step_impl(params, grads, state1, absmax1, state2, absmax2, kind, lr, beta1, beta2, eps, weight_decay, step,
               first=False, nesterov=False, sr_seed=-1):
    lists = (params, grads, state1, absmax1, state2, absmax2, kind)
    _check_step(*lists, lists_only=True)
    if not params:
        return
    if kind in TWO_STATE and step < 1:
        raise ValueError(f"fusedops.{STEP_OP}: step must be >= 1 for {kind}, got {step}")
    if sr_seed < -1 or sr_seed >= 2 ** 32:
        raise ValueError(f"fusedops.{STEP_OP}: sr_seed must be -1 (off) or in [0, 2^32), got {sr_seed}")
    # (the params alone: one pass over every list would cost ~64 ns a tensor, 5 a param; the
    # optimizers create their states as normal tensors)
    _validate.writable_all(params, "params", STEP_OP)
    backend = _step.backend_for(params[0].device.type)
    if backend != "reference" and _native.ops is not None:
        # The extension checks every tensor (dtype, device, shape, layout, state sizes, no
        # overlapping writes: csrc/optim8bit_tensors.h collect) before anything is written, in
        # microseconds; the Python checks cost milliseconds a step for ~100 tensors, so they
        # run only to name the argument when the extension refuses.
        h = reference.optimizer_hyper(kind, lr, beta1, beta2, eps, weight_decay, step)
        key = reference.sr_key(sr_seed, step) if sr_seed >= 0 and params[0].dtype == torch.bfloat16 else -1
        try:
            _step.get(backend)(params, grads, state1, absmax1, state2, absmax2, kind, h, first, nesterov, key)
        except RuntimeError:
            _check_step(*lists)
            raise
        return
    _check_step(*lists)
    if backend == "reference":
        reference.optimizer_step_8bit_(params, grads, state1, absmax1, state2, absmax2, kind, lr, beta1, beta2, eps,
                                       weight_decay, step, first, nesterov, sr_seed)
        return
    h = reference.optimizer_hyper(kind, lr, beta1, beta2, eps, weight_decay, step)
    key = reference.sr_key(sr_seed, step) if sr_seed >= 0 and params[0].dtype == torch.bfloat16 else -1
    _step.get(backend)(params, grads, state1, absmax1, state2, absmax2, kind, h, first, nesterov, key)


def _step_fake(params, grads, state1, absmax1, state2, absmax2, kind, lr, beta1, beta2, eps, weight_decay, step,
               first=False, nesterov=False, sr_seed=-1):
    _check_step(params, grads, state1, absmax1, state2, absmax2, kind, memory=False)


step_op = define(f"{STEP_OP}(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] absmax1, "
                 "Tensor(d!)[] state2, Tensor(e!)[] absmax2, str kind, float lr, float beta1, float beta2, "
                 "float eps, float weight_decay, int step, bool first=False, bool nesterov=False, int sr_seed=-1) -> ()",
                 _step_impl, _step_fake)

_H_ORDER = ("lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "weight_decay", "decay",
            "step_size", "inv_bc2_sqrt")


@_step.register("cuda")
@_step.register("cpp")
def _step_native(params, grads, state1, absmax1, state2, absmax2, kind, h, first, nesterov, sr_key):
    _native.op("optim8bit_step_")(params, grads, state1, absmax1, state2, absmax2, qmaps(params[0].device),
                                  _KIND_ID[kind], *(h[k] for k in _H_ORDER), first, nesterov, sr_key)


@_step.register("triton")
def _step_triton(params, grads, state1, absmax1, state2, absmax2, kind, h, first, nesterov, sr_key):
    kernels = _triton.kernels("optim8bit")
    device = params[0].device
    two = kind in TWO_STATE
    bpp = kernels.blocks_per_program()
    if _native.ops is not None:
        table = _native.op("optim8bit_table")(params, grads, state1, absmax1, state2, absmax2, two, bpp,
                                              device.type == "cuda")
    else:
        table = kernels.table_py(params, grads, state1, absmax1, state2, absmax2, two, bpp)
    programs, aligned = int(table[8, -1]), bool(table[7, -1])
    if device.type != "cpu":
        table = table.to(device, non_blocking=True)
    kernels.optim8bit_step_(table, programs, aligned, qmaps(device), kind, params[0].dtype, h, first, nesterov,
                            sr_key)


_step.register("reference")(lambda *a: reference.optimizer_step_8bit_(*a))  # signature of the op (+ sr_seed)


def kernel_codes(x: torch.Tensor, signed: bool, backend: str) -> torch.Tensor:
    """Codes (uint8) of the fp32 values x (already normalised) by the quantizer of the step
    kernel of `backend` ("cpp", "cuda", "triton"; "table" = table_quantize in torch). A
    test hook: the step kernels quantize inside the step and expose no op of their own."""
    x = x.float().contiguous()
    if backend == "table":
        return table_quantize(x, signed).to(torch.uint8)
    out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    if backend == "triton":
        _triton.kernels("optim8bit").codes_(x, out, qmaps(x.device), signed)
    else:
        _native.op("optim8bit_codes_")(x, out, qmaps(x.device), signed)
    return out


def optimizer_step_8bit_(params, grads, state1, absmax1, state2, absmax2, kind: str, lr: float, beta1: float,
                         beta2: float, eps: float, weight_decay: float, step: int, first: bool = False,
                         nesterov: bool = False, sr_seed: int = -1) -> None:
    """One optimizer step of `kind` ("adamw", "adam", "lion", "sgd") in place over all the
    tensors (one device, one param dtype; grads of the param dtype), in one kernel launch.

    state1[i]/absmax1[i]: first moment (Adam m, Lion / SGD momentum) — uint8 codes of the
    signed dynamic map with an fp32 absmax per 256 elements, or an fp32 state with an
    empty absmax. state2/absmax2: Adam's second moment (unsigned map); empty lists for
    Lion and SGD. `step` is the 1-based step count (Adam's bias corrections). For SGD,
    beta1 is the momentum and beta2 the dampening; `first` marks the step that
    initialises the momentum buffer (buf = g, as torch SGD); `nesterov` as torch.
    The math and the NaN/Inf rule are fusedops.reference.optimizer_update_fp32's.
    `sr_seed` >= 0 (< 2^32): bf16 params are rounded stochastically (unbiased), with random
    bits from a hash of (sr_seed, step, the param's position in the lists, element index):
    deterministic and the same on every backend; no effect on fp32 / fp16 params.
    """
    params, grads = list(params), list(grads)
    state1, absmax1, state2, absmax2 = list(state1), list(absmax1), list(state2), list(absmax2)
    if not params:
        if grads or state1 or absmax1 or state2 or absmax2:
            raise ValueError(f"fusedops.{STEP_OP}: params is empty but the other lists are not")
        return
    args = (params, grads, state1, absmax1, state2, absmax2, kind, float(lr), float(beta1), float(beta2), float(eps),
            float(weight_decay), int(step), bool(first), bool(nesterov), int(sr_seed))
    if _validate.plain_lists(params, grads, state1, absmax1, state2, absmax2):
        # eager, plain tensors: the op's kernel without the dispatcher round trip (six tensor
        # lists boxed and unboxed: most of a step's host time for ~100 small tensors); the
        # written tensors' versions bumped as the op does (ops/_library.py)
        _step_impl(*args)
        torch.autograd.graph.increment_version(params + state1 + absmax1 + state2 + absmax2)
        return
    step_op(*args)
