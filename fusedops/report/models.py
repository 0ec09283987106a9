"""Workloads of `python -m fusedops report`: built-in models, timm / transformers models,
and a user's own `module:function`.

A `Workload` builds a model (fixed seed, random init, no download), makes batch `k` of
the run deterministically (random data of the right shape, seeded by `k`, generated on
the device) and computes the training loss. The data is learnable — image / vector
classes have a fixed low-resolution prototype plus noise (images: 100 classes in use),
token sequences are arithmetic progressions modulo 2048 (64 when tiny) — so the
held-out loss falls within the default steps and loss curves can be compared
meaningfully.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class Workload:
    name: str
    build: Callable                 # () -> nn.Module, on CPU, fp32, seeded
    batch: Callable                 # (k: int, device) -> batch (tuple of tensors)
    loss_fn: Callable               # (model, batch) -> scalar loss
    items_per_step: int             # images / tokens / samples in one step
    unit: str                       # "images", "tokens", "samples"
    amp_dtype: torch.dtype | None = torch.bfloat16   # autocast dtype on CUDA (None: no autocast)
    channels_last: bool = False
    lr: float = 1e-3
    weight_decay: float = 0.01
    description: str = ""


def _gen(k: int, device, salt: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(1_000_003 * salt + k)
    return g


# What the image and token data draw from, so that the held-out loss falls clearly within the
# report's default steps (bench/NOTES.md, round 23; H100, eager, 30 steps): ResNet-50 with
# all 1000 classes (batch 128: ~4 images a class in 30 steps) went 6.97 → 6.90 while two data
# orders ended 0.064 apart; with 100 classes 6.95 → 1.20, orders 0.008 apart. GPT-2 with
# progressions over the whole 50257-token vocabulary went 10.97 → 10.90 (orders 0.15
# apart); modulo 2048, 10.98 → 7.67 (orders 0.004 apart). The models keep their full output
# size (FLOPs and memory as the real ones).
# The tiny configurations (a few steps on a CPU) draw tokens from 64: their held-out loss
# falls within the 3-4 steps the tests run.
IMAGE_CLASSES_USED = 100
VOCAB_USED, VOCAB_USED_TINY = 2048, 64


def _classification_batch(shape, classes, proto_shape, device, k, salt, used=None):
    """x = upsampled prototype of class y + noise; y uniform over the first `used` of the
    `classes` (all when None)."""
    g_proto = _gen(0, device, salt + 7919)
    protos = torch.randn((classes,) + proto_shape, generator=g_proto, device=device)
    g = _gen(k, device, salt)
    y = torch.randint(0, min(used or classes, classes), (shape[0],), generator=g, device=device)
    x = protos[y]
    if len(shape) == 4 and x.shape[-2:] != shape[-2:]:
        x = F.interpolate(x, size=shape[-2:], mode="nearest")
    x = x + 0.5 * torch.randn(shape, generator=g, device=device)
    return x, y


def _cross_entropy(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


# ----------------------------------------------------------------------------- ResNet-50

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.branch = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.branch(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), base: int = 64, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(base),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        blocks, cin = [], base
        for i, n in enumerate(layers):
            width = base * 2 ** i
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for b in blocks:   # zero-init the last BN of each branch (standard ResNet training trick)
            nn.init.zeros_(b.branch[-1].weight)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet50(tiny: bool = False) -> Workload:
    if tiny:
        layers, base, classes, batch, res = (1, 1, 1, 1), 8, 10, 4, 32
    else:
        layers, base, classes, batch, res = (3, 4, 6, 3), 64, 1000, 128, 224
    shape = (batch, 3, res, res)

    def build():
        torch.manual_seed(0)
        return ResNet(layers, base, classes)

    return Workload(
        name="resnet50" + ("-tiny" if tiny else ""), build=build,
        batch=lambda k, device: _classification_batch(shape, classes, (3, 8, 8), device, k, salt=1,
                                                      used=IMAGE_CLASSES_USED),
        loss_fn=_cross_entropy, items_per_step=batch, unit="images", channels_last=True, lr=1e-3,
        description=f"ResNet-{'tiny' if tiny else '50'} (bottleneck {layers}, width {base}), batch {batch}, "
                    f"{res}², {classes} classes ({min(classes, IMAGE_CLASSES_USED)} in the data), channels_last")


# ----------------------------------------------------------------------------- GPT-2 small

class Attention(nn.Module):
    """Causal self-attention through F.scaled_dot_product_attention (written without
    shape unpacking so that torch.fx can trace it: converters may need the dataflow)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))          # (b, t, 3, heads, d/heads)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (b, heads, t, d/heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, ctx: int, d: int, layers: int, heads: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight          # tied, as in GPT-2
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") or name.endswith("mlp.2.weight") \
                    else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        return self.lm_head(self.ln_f(self.blocks(x)))


def _token_batch(batch, ctx, vocab, device, k, used):
    """Arithmetic progressions (random start, stride in 1..16) modulo `used` (the
    vocabulary, if smaller): the model learns first which tokens occur, then the
    progressions from the context."""
    g = _gen(k, device, 2)
    used = min(vocab, used)
    start = torch.randint(0, used, (batch, 1), generator=g, device=device)
    stride = torch.randint(1, 17, (batch, 1), generator=g, device=device)
    seq = (start + stride * torch.arange(ctx + 1, device=device)) % used
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def _lm_loss(model, batch):
    idx, target = batch
    logits = model(idx)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), target.view(-1))


def gpt2(tiny: bool = False) -> Workload:
    if tiny:
        vocab, ctx, d, layers, heads, batch = 512, 64, 64, 2, 4, 2
    else:
        vocab, ctx, d, layers, heads, batch = 50257, 1024, 768, 12, 12, 8

    def build():
        torch.manual_seed(0)
        return GPT(vocab, ctx, d, layers, heads)

    return Workload(
        name="gpt2" + ("-tiny" if tiny else ""), build=build,
        batch=lambda k, device: _token_batch(batch, ctx, vocab, device, k, VOCAB_USED_TINY if tiny else VOCAB_USED),
        loss_fn=_lm_loss, items_per_step=batch * ctx, unit="tokens", lr=6e-4, weight_decay=0.1,
        description=f"GPT-2-{'tiny' if tiny else 'small'}-like: {layers} layers, d={d}, {heads} heads, "
                    f"vocab {vocab} ({min(vocab, VOCAB_USED_TINY if tiny else VOCAB_USED)} in the data), ctx {ctx}, "
                    f"batch {batch}×{ctx}, pre-norm, GELU(tanh), SDPA")


# ----------------------------------------------------------------------------- MLP blocks

class MLPBlock(nn.Module):
    """x + (LayerNorm → GELU → Linear(d, 4d) → GELU → Linear(4d, d))(x): the LayerNorm
    feeds the activation directly, ConvNeXt / MLP-Mixer style."""

    def __init__(self, d: int):
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(d), nn.GELU(), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return x + self.body(x)


class MLPNet(nn.Module):
    def __init__(self, d_in: int, d: int, depth: int, classes: int):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(*[MLPBlock(d) for _ in range(depth)])
        self.head = nn.Sequential(nn.LayerNorm(d), nn.ReLU(), nn.Linear(d, classes))

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def mlp(tiny: bool = False) -> Workload:
    if tiny:
        d_in, d, depth, classes, batch = 32, 64, 2, 10, 16
    else:
        d_in, d, depth, classes, batch = 1024, 1024, 8, 1000, 8192

    def build():
        torch.manual_seed(0)
        return MLPNet(d_in, d, depth, classes)

    return Workload(
        name="mlp" + ("-tiny" if tiny else ""), build=build,
        batch=lambda k, device: _classification_batch((batch, d_in), classes, (d_in,), device, k, salt=3),
        loss_fn=_cross_entropy, items_per_step=batch, unit="samples", lr=1e-3,
        description=f"MLP blocks (LayerNorm → GELU → Linear → GELU → Linear, residual): {depth} blocks, d={d}, "
                    f"batch {batch}, {classes} classes")


BUILTIN = {"resnet50": resnet50, "gpt2": gpt2, "mlp": mlp}


# ----------------------------------------------------------------------------- external models

def timm_model(name: str, tiny: bool = False) -> Workload:
    try:
        import timm
    except ImportError as exc:
        raise ValueError(f"model 'timm:{name}' needs timm installed (pip install timm)") from exc
    classes, batch, res = (10, 4, 64) if tiny else (1000, 128, 224)
    shape = (batch, 3, res, res)

    def build():
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=classes)

    return Workload(
        name=f"timm:{name}" + ("-tiny" if tiny else ""), build=build,
        batch=lambda k, device: _classification_batch(shape, classes, (3, 8, 8), device, k, salt=4,
                                                      used=IMAGE_CLASSES_USED),
        loss_fn=_cross_entropy, items_per_step=batch, unit="images", channels_last=True,
        description=f"timm {name} (random init), batch {batch}, {res}², {classes} classes "
                    f"({min(classes, IMAGE_CLASSES_USED)} in the data)")


def hf_model(name: str, tiny: bool = False) -> Workload:
    try:
        import transformers
    except ImportError as exc:
        raise ValueError(f"model 'hf:{name}' needs transformers installed (pip install transformers)") from exc
    if tiny:
        overrides = dict(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4) if name.startswith("gpt2") \
            else dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    else:
        overrides = {}
    config = transformers.AutoConfig.for_model(name.split("-")[0], **overrides) if "/" not in name else None
    if config is None:
        raise ValueError(f"hf:{name}: give a model type (e.g. hf:gpt2, hf:llama); no config is downloaded")
    vocab = config.vocab_size
    ctx = min(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024), 1024)
    batch = 2 if tiny else 8
    ctx = 64 if tiny else ctx

    def build():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        model.config.use_cache = False
        return model

    def loss(model, b):
        idx, target = b
        logits = model(input_ids=idx).logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), target.view(-1))

    return Workload(
        name=f"hf:{name}" + ("-tiny" if tiny else ""), build=build,
        batch=lambda k, device: _token_batch(batch, ctx, vocab, device, k, VOCAB_USED_TINY if tiny else VOCAB_USED),
        loss_fn=loss, items_per_step=batch * ctx, unit="tokens", lr=6e-4, weight_decay=0.1,
        description=f"transformers {name} (random init from config), batch {batch}×{ctx}")


def user_model(spec: str, tiny: bool = False) -> Workload:
    """`package.module:function`; function(tiny=...) (or function()) returns (model, batch, loss_fn):
    batch is a tensor or a tuple of tensors used at every step, or a callable k -> batch giving
    step k's batch (then data order, and so the agreement spread, means something); the first
    tensor's first dimension counts the samples; loss_fn(model, batch) -> scalar loss."""
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model {spec!r}: cannot import {fn_name} from {mod_name}: {exc}") from exc
    try:
        takes_tiny = "tiny" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_tiny = False
    model, batch, loss_fn = fn(tiny=tiny) if takes_tiny else fn()
    make = batch if callable(batch) else (lambda k: batch)
    lone = not isinstance(make(0), (tuple, list))
    if lone:                                       # a lone tensor: loss_fn gets it as it was given
        user_loss = loss_fn
        loss_fn = lambda m, b: user_loss(m, b[0])   # noqa: E731

    def batch_k(k, device):
        b = make(k)
        b = (b,) if lone else tuple(b)
        return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in b)

    first = batch_k(0, "cpu")[0]
    items = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def build():
        model.load_state_dict(state)
        return model

    return Workload(name=spec, build=build, batch=batch_k, loss_fn=loss_fn, items_per_step=items, unit="samples",
                    description=f"user model {spec}")


def get(spec: str, tiny: bool = False) -> Workload:
    if spec in BUILTIN:
        return BUILTIN[spec](tiny)
    if spec.startswith("timm:"):
        return timm_model(spec[5:], tiny)
    if spec.startswith("hf:"):
        return hf_model(spec[3:], tiny)
    if ":" in spec:
        return user_model(spec, tiny)
    raise ValueError(f"unknown model {spec!r}; built-in: {', '.join(BUILTIN)}; or timm:NAME, hf:NAME, module:function")
