"""A labelled suite of small CPU training runs, healthy and broken on purpose.

Each `Case` trains a tiny model on synthetic data (nothing is downloaded)
through the real logger into a real event file, and says which finding kinds
it must produce, on which layers, and which other kinds are correct
consequences of the same fault (a learning rate so high that training ends in
NaN also makes updates far too large). Healthy cases must produce nothing
above `info`. `CASES` is the suite the tests train (`tests/test_findings.py`);
`VARIANTS` adds other architectures and settings for the benchmark only
(`benchmarks/findings_quality.py`). Every run takes a second or two on one
core.

    from pathologies import CASES, train
    path = train(CASES["vanishing_sigmoid"], "/tmp/suite", seed=0)
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tb_diag_logger import Diagnostics

# What a training step returns: (total loss, named components for `losses=`).
LossOut = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass
class Training:
    """Everything one run needs: model, optimizer, how to compute a step's loss."""

    model: nn.Module
    opt: torch.optim.Optimizer
    loss: Callable[[int], LossOut]  # step -> (loss, components)
    steps: int = 120
    every: int = 2
    sched: Optional[object] = None
    scaler: Optional[object] = None
    clip: Optional[float] = None  # clip_grad_norm_ threshold; its pre-clip norm goes to diag.step(grad_norm=)
    val: Optional[Callable[[], torch.Tensor]] = None  # the validation loss, for diag.evaluate()
    eval_every: int = 10
    # The case's own loop, called once in place of `train`'s (a bug in the loop itself: no zero_grad(),
    # diag.step() before backward()); it receives this Training and the attached Diagnostics.
    loop: Optional[Callable[[Training, Diagnostics], None]] = None


@dataclass(frozen=True)
class Case:
    """A labelled run: what it must produce, and what it may produce besides."""

    name: str
    build: Callable[[torch.Generator], Training]
    kinds: tuple[str, ...] = ()  # must be found at warning or error; () = healthy
    layers: dict[str, tuple[str, ...]] = field(default_factory=dict)  # kind -> layers that must be named
    allowed: tuple[str, ...] = ()  # other kinds that are correct diagnoses of the same fault
    note: str = ""

    @property
    def healthy(self) -> bool:
        return not self.kinds


# ------------------------------------------------------------------ data
def _teacher(g: torch.Generator, d: int = 16, classes: int = 4, n: int = 1024):
    """A learnable classification set: labels from a random linear teacher."""
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (x @ w).argmax(1)
    return x, y


def _batches(g: torch.Generator, x: torch.Tensor, y: torch.Tensor, batch: int = 64):
    def at(step: int):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        return x[idx], y[idx]

    return at


def _mlp(d: int, width: int, depth: int, act: Callable[[], nn.Module], out: int = 4) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d if i == 0 else width, width), act()]
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


def _init_normal(model: nn.Module, std: float, g: torch.Generator, bias: Optional[float] = None) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
                if bias is not None:
                    m.bias.fill_(bias)


def _seed_model(g: torch.Generator) -> None:
    # Module constructors draw from the global generator: tie them to the case's seed.
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))


Corrupt = Callable[[int, torch.Tensor, torch.Tensor], tuple]


def _ce_training(model: nn.Module, opt, g: torch.Generator, *, steps: int = 120, every: int = 2,
                 l2: float = 0.0, sched=None, corrupt: Optional[Corrupt] = None,
                 d: int = 16, batch_size: int = 64) -> Training:
    """Cross-entropy on the teacher set, with per-sample `ce` and an optional `l2` component."""
    x, y = _teacher(g, d=d)
    batch = _batches(g, x, y, batch_size)

    def loss(step: int) -> LossOut:
        xb, yb = batch(step)
        if corrupt is not None:
            xb, yb = corrupt(step, xb, yb)
        ce = F.cross_entropy(model(xb), yb, reduction="none")
        parts = {"ce": ce}
        total = ce.mean()
        if l2:
            reg = l2 * sum((p * p).sum() for p in model.parameters())
            parts["l2"] = reg
            total = total + reg
        return total, parts

    return Training(model, opt, loss, steps=steps, every=every, sched=sched)


# --------------------------------------------------------------- healthy
def healthy_mlp(g: torch.Generator) -> Training:
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)
    return _ce_training(m, torch.optim.Adam(m.parameters(), lr=1e-3), g, l2=1e-4)


def healthy_cnn(g: torch.Generator) -> Training:
    """Conv + BatchNorm + ReLU; the convs keep their (redundant) bias, as much user code does."""
    _seed_model(g)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

    def loss(step: int) -> LossOut:
        # The class is the quadrant that holds a bright blob.
        yb = torch.randint(0, 4, (32,), generator=g)
        xb = 0.5 * torch.randn(32, 1, 12, 12, generator=g)
        for i, c in enumerate(yb.tolist()):
            r, col = divmod(c, 2)
            xb[i, 0, 6 * r + 1: 6 * r + 5, 6 * col + 1: 6 * col + 5] += 1.5
        ce = F.cross_entropy(m(xb), yb)
        return ce, {"ce": ce}

    return Training(m, opt, loss, steps=100)


class TinyTransformer(nn.Module):
    """Pre-norm encoder (GELU, LayerNorm) predicting each token's predecessor."""

    def __init__(self, vocab: int = 12, d: int = 32, seq: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(seq, d))
        layer = nn.TransformerEncoderLayer(
            d, 4, dim_feedforward=64, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.norm(self.encoder(h)))


def healthy_transformer(g: torch.Generator) -> Training:
    """AdamW with linear warm-up then cosine decay to zero (update ratios near 0 at both ends)."""
    _seed_model(g)
    m = TinyTransformer()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01)
    steps = 120
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )

    def loss(step: int) -> LossOut:
        tok = torch.randint(0, 12, (32, 8), generator=g)
        target = torch.roll(tok, 1, dims=1)
        ce = F.cross_entropy(m(tok).reshape(-1, 12), target.reshape(-1))
        return ce, {"ce": ce}

    return Training(m, opt, loss, steps=steps, sched=sched)


def healthy_tanh_bce(g: torch.Generator) -> Training:
    """Tanh MLP ending in nn.Sigmoid, hand-written BCE: confident outputs are not saturation trouble."""
    _seed_model(g)
    m = nn.Sequential(_mlp(16, 32, 2, nn.Tanh, out=1), nn.Sigmoid())
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(1024, 16, generator=g)
    y = (x @ torch.randn(16, generator=g) > 0).float()
    batch = _batches(g, x, y)

    def loss(step: int) -> LossOut:
        xb, yb = batch(step)
        p = m(xb).squeeze(1).clamp(1e-6, 1 - 1e-6)
        bce = -(yb * p.log() + (1 - yb) * (1 - p).log())
        return bce.mean(), {"bce": bce}

    return Training(m, opt, loss, steps=200)


def healthy_regression(g: torch.Generator) -> Training:
    """MSE regression fitted to near zero, SGD momentum with cosine decay to 0, every step logged."""
    _seed_model(g)
    m = _mlp(8, 64, 2, nn.ReLU, out=1)
    steps = 150
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
    x = torch.randn(2048, 8, generator=g)
    t = x[:, 0] - 0.5 * x[:, 1] + 0.25 * x[:, 2] * x[:, 3]

    def loss(step: int) -> LossOut:
        idx = torch.randint(0, 2048, (64,), generator=g)
        mse = (m(x[idx]).squeeze(1) - t[idx]) ** 2
        return mse.mean(), {"mse": mse}

    return Training(m, opt, loss, steps=steps, every=1, sched=sched)


def healthy_easy_weight_decay(g: torch.Generator) -> Training:
    """An easy task fitted to ~0 cross-entropy under an L2 term that ends larger than it (normal)."""
    _seed_model(g)
    m = _mlp(16, 64, 2, nn.ReLU)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    batch = _batches(g, x, y)

    def loss(step: int) -> LossOut:
        xb, yb = batch(step)
        ce = F.cross_entropy(m(xb), yb)
        l2 = 1e-3 * sum((p * p).sum() for p in m.parameters())
        return ce + l2, {"ce": ce, "l2": l2}

    return Training(m, opt, loss, steps=150, every=3)


class ResidualMLP(nn.Module):
    """Eight pre-norm residual ReLU blocks: deep, yet gradients flow."""

    def __init__(self, d: int = 16, width: int = 32, blocks: int = 8, out: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
            for _ in range(blocks)
        )
        self.out = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(F.relu(h))


def healthy_residual_amp(g: torch.Generator) -> Training:
    """Deep residual MLP under bf16 autocast with a GradScaler (scaled gradients, recorded unscaled)."""
    _seed_model(g)
    m = ResidualMLP()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _teacher(g)
    batch = _batches(g, x, y)

    def loss(step: int) -> LossOut:
        xb, yb = batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(xb)
        ce = F.cross_entropy(logits.float(), yb)
        return ce, {"ce": ce}

    return Training(m, opt, loss, steps=120, scaler=scaler)


class TinyGPT(nn.Module):
    """A nanoGPT-shaped causal LM: token + position embeddings, pre-norm blocks (causal attention,
    GELU MLP), a final LayerNorm and an untied head."""

    def __init__(self, vocab: int = 32, d: int = 32, blocks: int = 2, seq: int = 16) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(_GPTBlock(d) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.tok(t) + self.pos(torch.arange(t.shape[1]))
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln_f(h))


class _GPTBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def _gpt_training(g: torch.Generator, opt_fn: Callable[[nn.Module], torch.optim.Optimizer], *, steps: int = 120,
                  warmup: int = 0, cosine: bool = False, clip: Optional[float] = None) -> Training:
    """Next token of arithmetic sequences mod 32 (learnable: the stride shows in the first two tokens)."""
    _seed_model(g)
    m = TinyGPT()
    opt = opt_fn(m)
    sched = None
    if warmup or cosine:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * (
            0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) if cosine else 1.0))

    def loss(step: int) -> LossOut:
        start = torch.randint(0, 32, (16, 1), generator=g)
        stride = torch.randint(1, 4, (16, 1), generator=g)
        seq = (start + stride * torch.arange(17)) % 32
        ce = F.cross_entropy(m(seq[:, :-1]).reshape(-1, 32), seq[:, 1:].reshape(-1))
        return ce, {"ce": ce}

    return Training(m, opt, loss, steps=steps, sched=sched, clip=clip)


def healthy_gpt(g: torch.Generator) -> Training:
    """nanoGPT's recipe: AdamW (wd 0.1), linear warm-up, cosine decay, clip_grad_norm_ at 1.0."""
    return _gpt_training(g, lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1),
                         warmup=10, cosine=True, clip=1.0)


def healthy_fp16_overflow(g: torch.Generator) -> Training:
    """fp16 autocast with GradScaler(init_scale=2**32): the first steps overflow and are skipped by design."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x, y = _teacher(g)
    batch = _batches(g, x, y)

    def loss(step: int) -> LossOut:
        xb, yb = batch(step)
        with torch.autocast("cpu", dtype=torch.float16):
            logits = m(xb)
        ce = F.cross_entropy(logits.float(), yb)
        return ce, {"ce": ce}

    return Training(m, opt, loss, steps=120, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**32))


class _FrozenBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = _mlp(16, 64, 2, nn.ReLU, out=64)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.backbone(x)))


def healthy_frozen_backbone(g: torch.Generator) -> Training:
    """Fine-tuning a head on a backbone frozen on purpose (requires_grad False, not in the optimizer)."""
    _seed_model(g)
    m = _FrozenBackbone()
    m.backbone.requires_grad_(False)
    return _ce_training(m, torch.optim.Adam(m.head.parameters(), lr=3e-3), g)


# ------------------------------------------------------------ pathologies
def vanishing_sigmoid(g: torch.Generator) -> Training:
    """20 sigmoid layers: each multiplies the gradient by at most 1/4.

    With the README's L2 term in the loss, whose gradient 2e-4 * w is all the early layers get.
    """
    _seed_model(g)
    m = _mlp(16, 32, 20, nn.Sigmoid)
    return _ce_training(m, torch.optim.SGD(m.parameters(), lr=0.1), g, steps=80, l2=1e-4)


def vanishing_tanh_tiny_init(g: torch.Generator) -> Training:
    """Tanh net with weights ~N(0, 0.01^2): activations and back-propagated gradients shrink ~50x a layer."""
    _seed_model(g)
    m = _mlp(16, 64, 8, nn.Tanh)
    _init_normal(m, 0.01, g, bias=0.0)
    return _ce_training(m, torch.optim.SGD(m.parameters(), lr=0.05), g, steps=80)


def exploding_huge_init(g: torch.Generator) -> Training:
    """10-layer ReLU MLP, weights ~N(0, 1) (He init would be 0.18): gradients ~1e8 from step 0."""
    _seed_model(g)
    m = _mlp(16, 64, 10, nn.ReLU)
    _init_normal(m, 1.0, g, bias=0.0)
    # Small enough a learning rate that the run stays finite for a while.
    return _ce_training(m, torch.optim.SGD(m.parameters(), lr=1e-12), g, steps=60)


def exploding_lr_growth(g: torch.Generator) -> Training:
    """SGD with momentum whose learning rate grows 6 % a step: gradients grow until they overflow."""
    _seed_model(g)
    m = _mlp(16, 64, 4, nn.ReLU)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.06**s)
    return _ce_training(m, opt, g, steps=160, sched=sched)


def dead_relu_negative_bias(g: torch.Generator) -> Training:
    """Hidden biases start at -3 (inputs ~N(0,1)): most units never fire and get no gradient."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)
    with torch.no_grad():
        for layer in list(m)[:-1]:
            if isinstance(layer, nn.Linear):
                layer.bias.fill_(-3.0)
    return _ce_training(m, torch.optim.SGD(m.parameters(), lr=0.05), g, steps=80)


def dead_relu_high_lr(g: torch.Generator) -> Training:
    """SGD at lr 3: large updates push the ReLUs' pre-activations negative for good."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)
    return _ce_training(m, torch.optim.SGD(m.parameters(), lr=3.0), g, steps=100)


def saturated_sigmoid_large_init(g: torch.Generator) -> Training:
    """Sigmoid MLP with weights ~N(0, 1): pre-activations of std ~8 sit in the flat tails."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.Sigmoid)
    _init_normal(m, 1.0, g)
    return _ce_training(m, torch.optim.SGD(m.parameters(), lr=0.05), g, steps=80)


def saturated_tanh_unscaled_input(g: torch.Generator) -> Training:
    """Tanh MLP fed raw features of scale ~100 (not standardised)."""
    _seed_model(g)
    m = _mlp(16, 64, 2, nn.Tanh)

    def corrupt(step, xb, yb):
        return xb * 100.0, yb

    return _ce_training(m, torch.optim.SGD(m.parameters(), lr=0.01), g, steps=80, corrupt=corrupt)


def nonfinite_diverging_lr(g: torch.Generator) -> Training:
    """Tanh MLP regression with SGD at lr 0.5: the output layer grows geometrically until inf, then NaN."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.Tanh, out=1)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(1024, 16, generator=g)
    t = 3.0 * torch.sin(3.0 * x[:, 0])

    def loss(step: int) -> LossOut:
        idx = torch.randint(0, 1024, (64,), generator=g)
        mse = F.mse_loss(m(x[idx]).squeeze(1), t[idx])
        return mse, {"mse": mse}

    return Training(m, opt, loss, steps=60)


def nonfinite_log_zero(g: torch.Generator) -> Training:
    """Regression on log(target) where a batch holds a zero target (log 0 = -inf) at step 60."""
    _seed_model(g)
    m = _mlp(16, 32, 2, nn.ReLU, out=1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.randn(1024, 16, generator=g)
    target = torch.exp(0.3 * (x @ torch.randn(16, generator=g)))  # positive

    def loss(step: int) -> LossOut:
        idx = torch.randint(0, 1024, (64,), generator=g)
        t = target[idx].clone()
        if step == 60:
            t[3] = 0.0
        mse = F.mse_loss(m(x[idx]).squeeze(1), torch.log(t))
        return mse, {"mse": mse}

    return Training(m, opt, loss, steps=80)


def update_ratio_lr_too_high(g: torch.Generator) -> Training:
    """Adam at lr 0.3: each step moves the weights by about their own size."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.LeakyReLU)
    return _ce_training(m, torch.optim.Adam(m.parameters(), lr=0.3), g, steps=80)


def update_ratio_lr_too_low(g: torch.Generator) -> Training:
    """SGD at lr 1e-7: updates are ~1e-9 of the weights; nothing is learned."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)
    return _ce_training(m, torch.optim.SGD(m.parameters(), lr=1e-7), g, steps=80)


def update_ratio_adam_tiny_lr(g: torch.Generator) -> Training:
    """Adam at lr 1e-9."""
    _seed_model(g)
    m = _mlp(16, 64, 2, nn.GELU)
    return _ce_training(m, torch.optim.Adam(m.parameters(), lr=1e-9), g, steps=80)


def gpt_lr_blowup(g: torch.Generator) -> Training:
    """The small GPT at AdamW lr 1, no clipping: the loss jumps ~30x within a few steps and stays, no NaN."""
    return _gpt_training(g, lambda m: torch.optim.AdamW(m.parameters(), lr=1.0))


def gradient_clipping_lr_too_high(g: torch.Generator) -> Training:
    """The small GPT at AdamW lr 0.5 with clip_grad_norm_ at 1.0: clipping hides a learning rate ~100x too high.

    At lr 0.3 one seed in five clipped only 42 % of its logged steps (the others 60-70 %): not "most steps";
    at 0.5 every seed of 0-4 clips 93-98 %.
    """
    return _gpt_training(g, lambda m: torch.optim.AdamW(m.parameters(), lr=0.5), clip=1.0)


class _DetachedEncoder(nn.Module):
    """A textbook bug: the encoder's output is .detach()ed, so the encoder never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).detach())


def no_gradient_detached_branch(g: torch.Generator) -> Training:
    _seed_model(g)
    m = _DetachedEncoder()
    return _ce_training(m, torch.optim.Adam(m.parameters(), lr=3e-3), g)


def weight_decay_equilibrium(g: torch.Generator) -> Training:
    """AdamW at lr 1e-2 with weight decay 30: lr x wd = 0.3 per step pins the weights near 0."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)
    return _ce_training(m, torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=30.0), g)


def overfitting_memorised(g: torch.Generator) -> Training:
    """64 training samples (a quarter of the labels wrong) memorised by a 512-wide MLP; a held-out set."""
    _seed_model(g)
    x, y = _teacher(g, n=576)
    noisy = y.clone()
    flip = torch.rand(576, generator=g) < 0.25
    noisy[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=g)
    xt, yt, xv, yv = x[:64], noisy[:64], x[64:], y[64:]
    m = _mlp(16, 512, 2, nn.ReLU)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)

    def loss(step: int) -> LossOut:
        ce = F.cross_entropy(m(xt), yt, reduction="none")
        return ce.mean(), {"ce": ce}

    def val() -> torch.Tensor:
        with torch.no_grad():
            return F.cross_entropy(m(xv), yv)

    return Training(m, opt, loss, steps=160, every=2, val=val, eval_every=10)


def adam_eps_too_large(g: torch.Generator) -> Training:
    """Adam with eps 1.0 (a typo for 1e-8) on gradients of ~1e-2: eps, not the gradient, sets every step."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)
    return _ce_training(m, torch.optim.Adam(m.parameters(), lr=1e-2, eps=1.0), g)


def underfitting_linear(g: torch.Generator) -> Training:
    """A linear classifier for labels that are mostly XORs of feature signs: one bit of three is linear."""
    _seed_model(g)
    m = nn.Linear(16, 8)
    _init_normal(m, 0.5, g, bias=0.0)  # weights of the size training gives them: updates stay ~1e-2 of them
    x = torch.randn(2048, 16, generator=g)
    b = (x[:, :5] > 0).long()
    y = 4 * (b[:, 0] ^ b[:, 1]) + 2 * (b[:, 2] ^ b[:, 3]) + b[:, 4]
    xt, yt, xv, yv = x[:1536], y[:1536], x[1536:], y[1536:]
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    def loss(step: int) -> LossOut:
        idx = torch.randint(0, 1536, (256,), generator=g)
        ce = F.cross_entropy(m(xt[idx]), yt[idx], reduction="none")
        return ce.mean(), {"ce": ce}

    def val() -> torch.Tensor:
        with torch.no_grad():
            return F.cross_entropy(m(xv), yv)

    return Training(m, opt, loss, steps=200, val=val, eval_every=10)


def _spike_at(steps: tuple[int, ...], fn):
    def corrupt(step, xb, yb):
        return fn(xb, yb) if step in steps else (xb, yb)

    return corrupt


def loss_spike_corrupted_inputs(g: torch.Generator) -> Training:
    """A healthy MLP that sees two corrupted batches (inputs x30) at steps 60 and 100."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)
    corrupt = _spike_at((60, 100), lambda xb, yb: (xb * 30.0, yb))
    return _ce_training(m, torch.optim.Adam(m.parameters(), lr=1e-3), g, steps=140, corrupt=corrupt)


def loss_spike_wrong_labels(g: torch.Generator) -> Training:
    """A healthy MLP that sees one batch with every label wrong at step 80."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)
    corrupt = _spike_at((80,), lambda xb, yb: (xb, (yb + 1 + (xb[:, 0] > 0).long()) % 4))
    return _ce_training(m, torch.optim.Adam(m.parameters(), lr=3e-3), g, steps=120, corrupt=corrupt)


def loss_not_decreasing_zero_lr(g: torch.Generator) -> Training:
    """The learning rate is 0."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)
    return _ce_training(m, torch.optim.SGD(m.parameters(), lr=0.0), g, steps=80)


def loss_not_decreasing_random_labels(g: torch.Generator) -> Training:
    """Labels drawn at random for every batch: there is nothing to learn."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)

    def corrupt(step, xb, yb):
        return xb, torch.randint(0, 4, yb.shape, generator=g)

    return _ce_training(m, torch.optim.Adam(m.parameters(), lr=1e-3), g, steps=100, corrupt=corrupt)


def dominance_l2(g: torch.Generator) -> Training:
    """An L2 regulariser with coefficient 1.0: ~1000x the cross-entropy."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)
    return _ce_training(m, torch.optim.SGD(m.parameters(), lr=0.01), g, steps=80, l2=1.0)


def dominance_aux_penalty(g: torch.Generator) -> Training:
    """A regression whose L1 weight penalty (scalar, named `penalty`) dwarfs the per-sample MSE."""
    _seed_model(g)
    m = _mlp(16, 32, 2, nn.Tanh, out=1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x = torch.randn(1024, 16, generator=g)
    t = torch.sin(x[:, 0]) + 0.5 * x[:, 1]

    def loss(step: int) -> LossOut:
        idx = torch.randint(0, 1024, (64,), generator=g)
        mse = (m(x[idx]).squeeze(1) - t[idx]) ** 2
        penalty = 5.0 * sum(p.abs().sum() for p in m.parameters())
        return mse.mean() + penalty, {"mse": mse, "penalty": penalty}

    return Training(m, opt, loss, steps=80)


def _cases() -> dict[str, Case]:
    first_linear = ("0.weight",)
    cases = [
        Case("healthy_mlp", healthy_mlp, note="ReLU MLP, Adam 1e-3, small L2 term"),
        Case("healthy_cnn_bn", healthy_cnn, note="Conv(bias)+BatchNorm+ReLU, SGD momentum"),
        Case("healthy_transformer", healthy_transformer, note="pre-norm encoder, GELU, LayerNorm, warm-up + cosine"),
        Case("healthy_tanh_bce", healthy_tanh_bce, note="tanh MLP, sigmoid output, BCE; confident outputs"),
        Case("healthy_regression", healthy_regression, note="MSE to ~0, SGD momentum, cosine to 0, every step"),
        Case("healthy_easy_weight_decay", healthy_easy_weight_decay, note="CE to ~0 under a larger L2 term"),
        Case("healthy_residual_amp", healthy_residual_amp, note="8 residual LayerNorm blocks, bf16 + GradScaler"),
        Case("healthy_gpt", healthy_gpt, note="small GPT, AdamW, warm-up, cosine, clip 1.0"),
        Case("healthy_fp16_overflow", healthy_fp16_overflow, note="fp16 + GradScaler(2**32): first steps skipped"),
        Case("healthy_frozen_backbone", healthy_frozen_backbone, note="backbone frozen on purpose, head trained"),
        Case("vanishing_sigmoid", vanishing_sigmoid, ("vanishing_gradient",), {"vanishing_gradient": first_linear},
             allowed=("loss_not_decreasing", "update_ratio", "saturated_activation")),
        Case("vanishing_tanh_tiny_init", vanishing_tanh_tiny_init, ("vanishing_gradient",),
             {"vanishing_gradient": first_linear}, allowed=("loss_not_decreasing", "update_ratio")),
        Case("exploding_huge_init", exploding_huge_init, ("exploding_gradient",),
             {"exploding_gradient": first_linear}, allowed=("nonfinite", "update_ratio", "loss_not_decreasing")),
        # The cause is the schedule itself (LambdaLR 1.06**step): lr_unbounded, with the exploding gradients
        # it causes folded below it.
        Case("exploding_lr_growth", exploding_lr_growth, ("lr_unbounded",), {},
             allowed=("nonfinite", "update_ratio", "loss_not_decreasing", "dead_relu", "loss_spike",
                      "vanishing_gradient", "weight_norm_growth", "loss_diverged", "exploding_gradient",
                      "gradient_spike")),
        Case("dead_relu_negative_bias", dead_relu_negative_bias, ("dead_relu",), {"dead_relu": ("1", "3", "5")},
             allowed=("vanishing_gradient", "loss_not_decreasing")),
        Case("dead_relu_high_lr", dead_relu_high_lr, ("dead_relu",), {},
             allowed=("vanishing_gradient", "loss_not_decreasing", "update_ratio", "loss_spike",
                      "exploding_gradient", "weight_norm_growth")),
        Case("saturated_sigmoid_large_init", saturated_sigmoid_large_init, ("saturated_activation",),
             {"saturated_activation": ("1",)}, allowed=("vanishing_gradient", "loss_not_decreasing")),
        Case("saturated_tanh_unscaled_input", saturated_tanh_unscaled_input,
             ("saturated_activation", "inputs_not_normalised"), {"saturated_activation": ("1",)},
             allowed=("vanishing_gradient",)),
        Case("nonfinite_diverging_lr", nonfinite_diverging_lr, ("nonfinite",), {},
             allowed=("exploding_gradient", "update_ratio", "loss_not_decreasing", "saturated_activation")),
        Case("nonfinite_log_zero", nonfinite_log_zero, ("nonfinite",), {"nonfinite": ("total",)},
             allowed=("loss_not_decreasing",)),
        Case("update_ratio_lr_too_high", update_ratio_lr_too_high, ("update_ratio",), {},
             allowed=("loss_not_decreasing", "loss_spike", "exploding_gradient", "weight_norm_growth")),
        Case("update_ratio_lr_too_low", update_ratio_lr_too_low, ("update_ratio",), {},
             allowed=("loss_not_decreasing",)),
        Case("update_ratio_adam_tiny_lr", update_ratio_adam_tiny_lr, ("update_ratio",), {},
             allowed=("loss_not_decreasing",)),
        Case("loss_spike_corrupted_inputs", loss_spike_corrupted_inputs, ("loss_spike",),
             {"loss_spike": ("total",)}, allowed=("gradient_spike",)),  # inputs x30: the gradients spike too
        Case("loss_spike_wrong_labels", loss_spike_wrong_labels, ("loss_spike",), {"loss_spike": ("total",)}),
        # The cause, named: lr_zero; the flat loss and the unmoving weights follow from it.
        Case("loss_not_decreasing_zero_lr", loss_not_decreasing_zero_lr, ("lr_zero",), {},
             allowed=("update_ratio", "loss_not_decreasing")),
        Case("loss_not_decreasing_random_labels", loss_not_decreasing_random_labels, ("loss_not_decreasing",),
             {"loss_not_decreasing": ("total",)}),
        Case("dominance_l2", dominance_l2, ("loss_component_dominance",),
             {"loss_component_dominance": ("l2",)}, allowed=("loss_not_decreasing", "dead_relu")),
        Case("dominance_aux_penalty", dominance_aux_penalty, ("loss_component_dominance",),
             {"loss_component_dominance": ("penalty",)}, allowed=("loss_not_decreasing",)),
        Case("gpt_lr_blowup", gpt_lr_blowup, ("loss_diverged",), {"loss_diverged": ("total",)},
             allowed=("update_ratio", "weight_norm_growth", "exploding_gradient", "logit_growth",
                      "loss_not_decreasing"), note="small GPT, AdamW lr 1, no clipping: no NaN"),
        Case("gradient_clipping_lr_too_high", gradient_clipping_lr_too_high, ("gradient_clipping",),
             {"gradient_clipping": ("grad_norm_preclip",)},
             allowed=("update_ratio", "weight_norm_growth", "loss_diverged", "loss_not_decreasing",
                      "exploding_gradient", "logit_growth"),
             note="small GPT, AdamW lr 0.5, clip 1.0: clipped on most steps"),
        Case("no_gradient_detached_branch", no_gradient_detached_branch, ("no_gradient",),
             {"no_gradient": ("encoder.0.weight", "encoder.2.weight")}, allowed=("loss_not_decreasing",)),
        Case("weight_decay_equilibrium", weight_decay_equilibrium, ("weight_decay_equilibrium",), {},
             allowed=("loss_not_decreasing", "update_ratio", "vanishing_gradient", "adam_eps", "dead_relu")),
        Case("overfitting_memorised", overfitting_memorised, ("overfitting",), {"overfitting": ("val_loss",)}),
        Case("adam_eps_too_large", adam_eps_too_large, ("adam_eps",), {"adam_eps": ("0.weight",)},
             allowed=("loss_not_decreasing", "update_ratio")),
        Case("underfitting_linear", underfitting_linear, ("underfitting",), {"underfitting": ("total",)}),
    ]
    return {c.name: c for c in cases}


CASES: dict[str, Case] = _cases()


# ------------------------------------------------------------------ variants
# Other architectures, optimisers, batch sizes and logging intervals, for the
# benchmark only (`benchmarks/findings_quality.py --variants`); the tests do
# not train them.
def _v_mlp(*, depth: int = 3, act: Callable[[], nn.Module] = nn.ReLU, opt: str = "adam", lr: float = 1e-3,
           momentum: float = 0.0, wd: float = 0.0, steps: int = 200, every: int = 5, batch: int = 64,
           width: int = 64, l2: float = 0.0, init_std: Optional[float] = None, bias: Optional[float] = None,
           spike_at: tuple[int, ...] = (), spike_scale: float = 1.0) -> Callable[[torch.Generator], Training]:
    def build(g: torch.Generator) -> Training:
        _seed_model(g)
        m = _mlp(16, width, depth, act)
        if init_std is not None:
            _init_normal(m, init_std, g, bias=bias)
        elif bias is not None:
            with torch.no_grad():
                for layer in list(m)[:-1]:
                    if isinstance(layer, nn.Linear):
                        layer.bias.fill_(bias)
        o = (torch.optim.Adam(m.parameters(), lr=lr, weight_decay=wd) if opt == "adam"
             else torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum, weight_decay=wd))
        corrupt = _spike_at(spike_at, lambda xb, yb: (xb * spike_scale, yb)) if spike_at else None
        return _ce_training(m, o, g, steps=steps, every=every, l2=l2, corrupt=corrupt, batch_size=batch)

    return build


def _v_cnn(*, bias: bool, sgd: bool, residual: bool, every: int) -> Callable[[torch.Generator], Training]:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1, bias=bias), nn.BatchNorm2d(16)
            self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=bias), nn.BatchNorm2d(16)
            self.c3, self.b3 = nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=bias), nn.BatchNorm2d(32)
            self.fc = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.b1(self.c1(x)))
            h2 = F.relu(self.b2(self.c2(h)))
            h = F.relu(self.b3(self.c3(h2 + h if residual else h2)))
            return self.fc(h.mean((2, 3)))

    def build(g: torch.Generator) -> Training:
        _seed_model(g)
        m = Net()
        o = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) if sgd
             else torch.optim.Adam(m.parameters(), lr=1e-3))

        def loss(step: int) -> LossOut:
            yb = torch.randint(0, 4, (32,), generator=g)
            xb = 0.5 * torch.randn(32, 1, 16, 16, generator=g)
            for i, c in enumerate(yb.tolist()):
                r, col = divmod(c, 2)
                xb[i, 0, 8 * r + 2: 8 * r + 6, 8 * col + 2: 8 * col + 6] += 1.0
            ce = F.cross_entropy(m(xb), yb)
            return ce, {"ce": ce}

        return Training(m, o, loss, steps=150, every=every)

    return build


class _CausalLM(nn.Module):
    def __init__(self, norm_first: bool, vocab: int = 20, d: int = 48, seq: int = 12) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        layer = nn.TransformerEncoderLayer(d, 4, 96, dropout=0.1, activation="gelu", batch_first=True,
                                           norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.tok(t) + self.pos(torch.arange(t.shape[1]))
        mask = nn.Transformer.generate_square_subsequent_mask(t.shape[1])
        return self.head(self.ln(self.enc(h, mask=mask, is_causal=True)))


def _v_lm(*, norm_first: bool, lr: float, steps: int, every: int) -> Callable[[torch.Generator], Training]:
    def build(g: torch.Generator) -> Training:
        _seed_model(g)
        m = _CausalLM(norm_first)
        o = torch.optim.AdamW(m.parameters(), lr=lr)

        def loss(step: int) -> LossOut:  # arithmetic sequences mod 20: next token from the last two
            start = torch.randint(0, 20, (32, 1), generator=g)
            stride = torch.randint(1, 3, (32, 1), generator=g)
            seq = (start + stride * torch.arange(13)) % 20
            ce = F.cross_entropy(m(seq[:, :-1]).reshape(-1, 20), seq[:, 1:].reshape(-1))
            return ce, {"ce": ce}

        return Training(m, o, loss, steps=steps, every=every)

    return build


def _v_lstm(g: torch.Generator) -> Training:
    _seed_model(g)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.rnn, self.fc = nn.Embedding(10, 16), nn.LSTM(16, 32, batch_first=True), nn.Linear(32, 2)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(self.emb(t))[0][:, -1])

    m = Net()
    o = torch.optim.Adam(m.parameters(), lr=3e-3)

    def loss(step: int) -> LossOut:  # does the sequence contain a 3?
        t = torch.randint(0, 10, (32, 10), generator=g)
        ce = F.cross_entropy(m(t), (t == 3).any(1).long())
        return ce, {"ce": ce}

    return Training(m, o, loss, steps=150, every=5)


def _v_sum_reduced(g: torch.Generator) -> Training:
    """A summed (not averaged) MSE over 256 x 16 outputs: large gradients, Adam does not mind."""
    _seed_model(g)
    m = _mlp(16, 128, 3, nn.ReLU, out=16)
    o = torch.optim.Adam(m.parameters(), lr=1e-3)
    x, w = torch.randn(4096, 16, generator=g), torch.randn(16, 16, generator=g)

    def loss(step: int) -> LossOut:
        idx = torch.randint(0, 4096, (256,), generator=g)
        mse = ((m(x[idx]) - torch.tanh(x[idx] @ w)) ** 2).sum()
        return mse, {"mse": mse}

    return Training(m, o, loss, steps=150, every=5)


def _variants() -> dict[str, Case]:
    cases = [
        Case("v_healthy_mlp_readme", _v_mlp(l2=1e-4, every=10, steps=300, batch=32), note="README loop"),
        Case("v_healthy_cnn_nobias", _v_cnn(bias=False, sgd=False, residual=False, every=5)),
        Case("v_healthy_cnn_residual_sgd", _v_cnn(bias=True, sgd=True, residual=True, every=10)),
        Case("v_healthy_lm_postnorm", _v_lm(norm_first=False, lr=3e-4, steps=150, every=5)),
        Case("v_healthy_lm_prenorm_every1", _v_lm(norm_first=True, lr=1e-3, steps=100, every=1)),
        Case("v_healthy_gelu_sgd_every1", _v_mlp(act=nn.GELU, opt="sgd", lr=0.1, momentum=0.9, every=1)),
        Case("v_healthy_tanh_adam", _v_mlp(act=nn.Tanh, every=10, steps=300)),
        Case("v_healthy_lstm", _v_lstm),
        Case("v_healthy_sum_reduced_mse", _v_sum_reduced),
        Case("v_healthy_batch8", _v_mlp(batch=8, every=2, lr=3e-3)),
        Case("v_healthy_adamw_wide", _v_mlp(lr=3e-3, wd=1e-2, every=5, steps=300, width=256)),
        Case("v_vanishing_sigmoid15_adam_l2", _v_mlp(depth=15, act=nn.Sigmoid, l2=1e-4), ("vanishing_gradient",),
             {"vanishing_gradient": ("0.weight",)}, allowed=("loss_not_decreasing",)),
        Case("v_exploding_init2_adam", _v_mlp(depth=6, init_std=2.0, bias=0.0), ("exploding_gradient",),
             {"exploding_gradient": ("0.weight",)}, allowed=("loss_not_decreasing",)),
        Case("v_dead_relu_bias5_adam", _v_mlp(bias=-5.0), ("dead_relu",), {"dead_relu": ("1", "3", "5")},
             allowed=("loss_not_decreasing",)),
        Case("v_saturated_sigmoid_init2", _v_mlp(act=nn.Sigmoid, init_std=2.0), ("saturated_activation",),
             {"saturated_activation": ("1",)}, allowed=("loss_not_decreasing", "vanishing_gradient")),
        Case("v_nonfinite_sgd10", _v_mlp(opt="sgd", lr=10.0, momentum=0.9, every=1, steps=60), ("nonfinite",),
             allowed=("exploding_gradient", "update_ratio", "dead_relu", "loss_not_decreasing",
                      "weight_norm_growth")),
        Case("v_update_ratio_adam01_every1", _v_mlp(lr=0.1, every=1, steps=100), ("update_ratio",),
             allowed=("dead_relu", "exploding_gradient", "loss_spike", "loss_not_decreasing")),
        Case("v_update_ratio_adam01_every10", _v_mlp(lr=0.1, every=10), ("update_ratio",),
             allowed=("dead_relu", "exploding_gradient", "loss_spike", "loss_not_decreasing")),
        Case("v_update_ratio_sgd2_tanh", _v_mlp(act=nn.Tanh, opt="sgd", lr=2.0), ("update_ratio",),
             allowed=("saturated_activation", "exploding_gradient", "loss_spike", "loss_not_decreasing")),
        Case("v_update_ratio_adam1e-9_every10", _v_mlp(lr=1e-9, every=10), ("update_ratio",),
             allowed=("loss_not_decreasing",)),
        Case("v_loss_spike_x100_every1", _v_mlp(every=1, spike_at=(120,), spike_scale=100.0), ("loss_spike",),
             {"loss_spike": ("total",)}),
        Case("v_loss_not_decreasing_lr0_every10", _v_mlp(opt="sgd", lr=0.0, every=10), ("loss_not_decreasing",),
             allowed=("update_ratio",)),
        Case("v_loss_not_decreasing_deep_default_init", _v_mlp(depth=8, opt="sgd", lr=0.05, momentum=0.9,
                                                               steps=300), ("loss_not_decreasing",),
             allowed=("dead_relu", "vanishing_gradient"), note="8 ReLU layers, default init: stalls"),
        Case("v_dominance_l2_x1000", _v_mlp(l2=3.0, steps=150), ("loss_component_dominance",),
             {"loss_component_dominance": ("l2",)}, allowed=("loss_not_decreasing", "dead_relu")),
    ]
    return {c.name: c for c in cases}


VARIANTS: dict[str, Case] = _variants()
ALL: dict[str, Case] = {**CASES, **VARIANTS}


def train(case: Case, logdir: str, seed: int = 0, name: Optional[str] = None) -> str:
    """Train `case` into `logdir/name` (default: the case's name); returns the run directory."""
    from torch.utils.tensorboard import SummaryWriter

    g = torch.Generator().manual_seed(seed)
    tr = case.build(g)
    path = os.path.join(logdir, name or case.name)
    writer = SummaryWriter(path)
    takes_norm = "grad_norm" in inspect.signature(Diagnostics.step).parameters
    with Diagnostics(tr.model, writer, every=tr.every, optimizer=tr.opt, scaler=tr.scaler) as diag:
        if tr.loop is not None:
            tr.loop(tr, diag)
        for step in range(tr.steps if tr.loop is None else 0):
            loss, parts = tr.loss(step)
            tr.opt.zero_grad()
            extra = {}
            if tr.scaler is not None:
                tr.scaler.scale(loss).backward()
            else:
                loss.backward()
            if tr.clip is not None:
                if tr.scaler is not None:
                    tr.scaler.unscale_(tr.opt)
                pre = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), tr.clip)
                if takes_norm:  # the pre-clip norm, where the logger takes it
                    extra["grad_norm"] = pre
            diag.step(step, loss=loss, losses=parts, **extra)
            if tr.scaler is not None:
                tr.scaler.step(tr.opt)
                tr.scaler.update()
            else:
                tr.opt.step()
            if tr.sched is not None:
                tr.sched.step()
            if tr.val is not None and (step + 1) % tr.eval_every == 0:
                diag.evaluate(step, loss=tr.val())
    writer.close()
    return path


def train_all(logdir: str, seed: int = 0, names: Optional[list[str]] = None, suffix: str = "") -> list[str]:
    """Train every case (or `names`) into `logdir`; returns the run directories.

    Runs on one thread (the models are tiny; more threads only contend), restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [train(CASES[n], logdir, seed, n + suffix) for n in (names or list(CASES))]
    finally:
        torch.set_num_threads(threads)
