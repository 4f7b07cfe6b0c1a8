"""A catalogue of everyday training-loop bugs, each with its healthy twin (issue 22, point 6).

Each case is a small CPU training written the way a user writes the loop,
with one mundane mistake taken from the public troubleshooting literature
(the source is named in its docstring), trained through the real logger by
`pathologies.train`. A `Bug` says which finding kinds must fire (warning or
error), on which layers, which other kinds are correct consequences, and which
words a finding that names the *cause* must contain (`cause`: every entry must
appear in the finding's message or suggestion, case-insensitively; "a|b" means
either). Where the cause is beyond what the logger can see (labels off by one,
a loader that repeats a batch), `beyond` says why, and the case is labelled
with the symptom it shows, honestly. A healthy twin (`twin` names it) is the
same loop, fixed: it must produce nothing above info.

    from everyday_bugs import BUGS, train
    path = train(BUGS["mlp_no_zero_grad"], "/tmp/bugs", seed=0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pathologies import (
    Case,
    LossOut,
    ResidualMLP,
    TinyGPT,
    Training,
    _batches,
    _FrozenBackbone,
    _mlp,
    _seed_model,
    _teacher,
    train,
)

__all__ = ["BUGS", "Bug", "HEALTHY", "BROKEN", "names_cause", "train"]


@dataclass(frozen=True)
class Bug(Case):
    """A `Case` with what a diagnosis of its cause must say."""

    cause: tuple[str, ...] = ()  # words the severe finding names the cause with ("a|b": either)
    twin: str = ""  # the healthy twin's name (for a bug), or "" (for a twin, or a bug with none)
    beyond: str = ""  # why the cause itself is outside what the logger records (symptom label only)
    warns: tuple[str, ...] = ()  # words a DiagnosticsWarning raised during the run must contain
    family: str = ""

    @property
    def healthy(self) -> bool:
        return not (self.kinds or self.beyond or self.warns)


def names_cause(bug: Bug, findings: list) -> bool:
    """Whether one of the run's most severe findings (error, else warning) names `bug.cause` in its words."""
    if not bug.cause:
        return False
    severe = [f for f in findings if f.severity == "error"] or [f for f in findings if f.severity == "warning"]
    for f in severe:
        text = f"{f.message} {f.suggestion}".lower()
        if all(any(w.lower() in text for w in word.split("|")) for word in bug.cause):
            return True
    return False


# ------------------------------------------------------------------ loops
def _user_loop(*, zero_grad: bool = True, diag_first: bool = False, unscale: bool = True,
               clip: Optional[float] = None) -> Callable[[Training, object], None]:
    """The loop as users write it, with the switches the bugs below turn off."""

    def run(tr: Training, diag) -> None:
        for step in range(tr.steps):
            if zero_grad:
                tr.opt.zero_grad()
            loss, parts = tr.loss(step)
            extra = {}
            if diag_first:  # logged before the gradients of this step exist
                diag.step(step, loss=loss, losses=parts)
            if tr.scaler is not None:
                tr.scaler.scale(loss).backward()
            else:
                loss.backward()
            if clip is not None:
                if tr.scaler is not None and unscale:
                    tr.scaler.unscale_(tr.opt)
                extra["grad_norm"] = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), clip)
            if not diag_first:
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

    return run


def _classify(model: nn.Module, opt, g: torch.Generator, *, steps: int = 120, every: int = 2, sched=None,
              loss_fn: Optional[Callable] = None, data=None, val: bool = False, val_mode: str = "toggle",
              loop=None, scaler=None, autocast: Optional[torch.dtype] = None, scale: float = 1.0) -> Training:
    """Cross-entropy (or `loss_fn(out, y)`) on the linear-teacher set; optional validation.

    `val_mode`: "toggle" (model.eval(), then model.train() again), "never_undone" (model.eval() only),
    "train" (no model.eval() at all).
    """
    x, y = data if data is not None else _teacher(g, n=4096)
    x = x * scale
    cut = 3 * x.shape[0] // 4
    xt, yt, xv, yv = x[:cut], y[:cut], x[cut:], y[cut:]
    batch = _batches(g, xt, yt)
    loss_fn = loss_fn or F.cross_entropy

    def loss(step: int) -> LossOut:
        xb, yb = batch(step)
        if autocast is not None:
            with torch.autocast("cpu", dtype=autocast):
                out = model(xb)
            out = out.float()
        else:
            out = model(xb)
        total = loss_fn(out, yb)
        return total, {"ce": total}

    def validate() -> torch.Tensor:
        if val_mode != "train":
            model.eval()
        with torch.no_grad():
            v = loss_fn(model(xv), yv)
        if val_mode == "toggle":
            model.train()
        return v

    return Training(model, opt, loss, steps=steps, every=every, sched=sched, scaler=scaler,
                    val=validate if val else None, loop=loop)


# ------------------------------------------------------------------ models
class SmallCNN(nn.Module):
    """Conv-BN-ReLU twice, global pooling, a linear head (named so that findings read well)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(self.drop(h.mean((2, 3))))


def _blobs(g: torch.Generator, n: int = 32):
    """Images whose class is the quadrant holding a bright blob."""
    yb = torch.randint(0, 4, (n,), generator=g)
    xb = 0.5 * torch.randn(n, 1, 12, 12, generator=g)
    for i, c in enumerate(yb.tolist()):
        r, col = divmod(c, 2)
        xb[i, 0, 6 * r + 1: 6 * r + 5, 6 * col + 1: 6 * col + 5] += 1.5
    return xb, yb


def _cnn_training(g: torch.Generator, *, opt: str = "sgd", val_mode: str = "toggle", loop=None,
                  steps: int = 100) -> Training:
    _seed_model(g)
    m = SmallCNN(dropout=0.2)
    o = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) if opt == "sgd"
         else torch.optim.Adam(m.parameters(), lr=3e-3))
    xv, yv = _blobs(g, 128)

    def loss(step: int) -> LossOut:
        xb, yb = _blobs(g, 32)
        ce = F.cross_entropy(m(xb), yb)
        return ce, {"ce": ce}

    def validate() -> torch.Tensor:
        if val_mode != "train":
            m.eval()
        with torch.no_grad():
            v = F.cross_entropy(m(xv), yv)
        if val_mode == "toggle":
            m.train()
        return v

    return Training(m, o, loss, steps=steps, val=validate, eval_every=10, loop=loop)


class DropResidual(ResidualMLP):
    """ResidualMLP with dropout in every block (what `model.eval()` silently turns off)."""

    def __init__(self) -> None:
        super().__init__(blocks=4)
        for b in self.blocks:
            b.append(nn.Dropout(0.3))


class SeqClassifier(nn.Module):
    """Embedding -> RNN/GRU/LSTM -> the last step's state -> a linear head."""

    def __init__(self, cell: str = "rnn", vocab: int = 10, d: int = 16, hidden: int = 32, out: int = 2,
                 padding_idx: Optional[int] = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.rnn = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell](d, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, out)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc(self.rnn(self.emb(t))[0][:, -1])


# ===================================================================== MLP
def mlp_loop(g: torch.Generator, *, zero_grad: bool = True, lr: float = 0.05, sched_fn=None,
             steps: int = 120) -> Training:
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
    sched = sched_fn(opt) if sched_fn is not None else None
    return _classify(m, opt, g, steps=steps, sched=sched, loop=_user_loop(zero_grad=zero_grad))


def healthy_mlp_loop(g: torch.Generator) -> Training:
    """The textbook loop (zero_grad, forward, backward, step), SGD momentum 0.9 at lr 0.05."""
    return mlp_loop(g)


def mlp_no_zero_grad(g: torch.Generator) -> Training:
    """PyTorch forums, "Why do we need to set the gradients manually to zero in pytorch?" and the
    classic "loss not decreasing / exploding, forgot optimizer.zero_grad()": every step adds its
    gradient to all the previous ones."""
    return mlp_loop(g, zero_grad=False, lr=0.01)


def mlp_lr_int_zero(g: torch.Generator) -> Training:
    """"37 Reasons why your Neural Network is not working" (#32, learning rate) and forum threads on a
    learning rate parsed with int(): ``lr=int(args.lr)`` turns 1e-3 into 0, so nothing moves."""
    return mlp_loop(g, lr=int(1e-3))


def mlp_scheduler_per_batch(g: torch.Generator) -> Training:
    """PyTorch forums, "scheduler.step() inside the batch loop": StepLR(step_size=10, gamma=0.1) meant as
    "divide by 10 every 10 epochs", stepped every batch: the learning rate falls 10x every 10 steps."""
    return mlp_loop(g, sched_fn=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.1))


def healthy_mlp_scheduler_per_epoch(g: torch.Generator) -> Training:
    """The same StepLR stepped once per epoch (an epoch = 40 batches here): two decays of 10x in the run."""
    tr = mlp_loop(g, sched_fn=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.1))
    sched, tr.sched = tr.sched, None
    inner = tr.loss

    def loss(step: int) -> LossOut:
        if step and step % 40 == 0:  # the epoch loop's scheduler.step()
            sched.step()
        return inner(step)

    tr.loss = loss
    return tr


def mlp_warmup_exponential(g: torch.Generator) -> Training:
    """Karpathy, "A Recipe for Training Neural Networks" (warm-up, then decay) done wrong: a warm-up
    written as ``LambdaLR(opt, lambda s: 1.08 ** s)`` with no cap, so the rate grows without bound."""
    return mlp_loop(g, lr=1e-3, sched_fn=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.08 ** s))


def healthy_mlp_warmup_capped(g: torch.Generator) -> Training:
    """The same warm-up, capped: ``min(1, 1.08 ** (s - 30))`` reaches lr 0.05 at step 30 and stays."""
    return mlp_loop(g, sched_fn=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, 1.08 ** (s - 30))))


def _head_loss(kind: str, g: torch.Generator) -> Training:
    _seed_model(g)
    if kind in ("softmax_ce", "logsoftmax_nll"):
        tail = nn.Softmax(dim=1) if kind == "softmax_ce" else nn.LogSoftmax(dim=1)
        m = nn.Sequential(*_mlp(16, 64, 2, nn.ReLU), tail)
        fn = F.cross_entropy if kind == "softmax_ce" else F.nll_loss
        return _classify(m, torch.optim.Adam(m.parameters(), lr=1e-3), g, loss_fn=fn)
    # Binary: is the teacher's first class the argmax?
    x, y = _teacher(g)
    yb = (y == 0).float()
    m = nn.Sequential(*_mlp(16, 64, 2, nn.ReLU, out=1), nn.Sigmoid()) if kind == "sigmoid_bcelogits" \
        else _mlp(16, 64, 2, nn.ReLU, out=1)
    return _classify(m, torch.optim.Adam(m.parameters(), lr=1e-3), g, data=(x, yb),
                     loss_fn=lambda out, t: F.binary_cross_entropy_with_logits(out.squeeze(1), t))


def mlp_softmax_into_cross_entropy(g: torch.Generator) -> Training:
    """PyTorch forums, "Softmax + CrossEntropyLoss" (cross_entropy already applies log_softmax) and
    "37 Reasons" #18 (check the loss function's expected input): a final nn.Softmax before
    F.cross_entropy squashes the gradients, and the loss stalls above its floor."""
    return _head_loss("softmax_ce", g)


def healthy_mlp_log_softmax_nll(g: torch.Generator) -> Training:
    """The correct pairing with an explicit normaliser: nn.LogSoftmax then F.nll_loss (a bait: the
    outputs are log-probabilities, each row's exp sums to 1)."""
    return _head_loss("logsoftmax_nll", g)


def mlp_sigmoid_into_bce_with_logits(g: torch.Generator) -> Training:
    """PyTorch forums, "BCEWithLogitsLoss with sigmoid output" (the loss applies its own sigmoid): the
    model ends in nn.Sigmoid and its output goes to binary_cross_entropy_with_logits."""
    return _head_loss("sigmoid_bcelogits", g)


def healthy_mlp_bce_with_logits(g: torch.Generator) -> Training:
    """The fix: raw logits into binary_cross_entropy_with_logits."""
    return _head_loss("bcelogits", g)


def mlp_unnormalised_inputs(g: torch.Generator) -> Training:
    """CS231n notes, "Data Preprocessing" (zero-centre and normalise), and "37 Reasons" #11 (standardise
    the features): raw features of scale ~100 into a ReLU MLP trained with SGD. The gradients of the first
    layer are ~100x those of a normalised run; SGD at a usual rate blows up."""
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)
    return _classify(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), g, scale=100.0, steps=80)


def mlp_labels_off_by_one(g: torch.Generator) -> Training:
    """Karpathy's recipe ("visualise just before the net": look at what goes in, labels included) and
    "37 Reasons" #2 (inputs and labels out of step): the labels are shifted by one sample against the
    inputs, so each label belongs to another sample and there is nothing to learn."""
    x, y = _teacher(g, n=4096)
    _seed_model(g)
    m = _mlp(16, 64, 3, nn.ReLU)
    return _classify(m, torch.optim.Adam(m.parameters(), lr=1e-3), g, data=(x, torch.roll(y, 1)), val=True)


def mlp_repeated_batch(g: torch.Generator) -> Training:
    """"37 Reasons" #5 (the data loader returns the same batch) and PyTorch forums' ``next(iter(loader))``
    inside the loop, which restarts an unshuffled loader at its first batch: the model memorises 64
    samples while the held-out loss rises."""
    _seed_model(g)
    x, y = _teacher(g, n=4096)
    m = _mlp(16, 64, 2, nn.ReLU)
    tr = _classify(m, torch.optim.Adam(m.parameters(), lr=3e-3), g, data=(x, y), val=True, steps=120)
    first = (x[:64], y[:64])

    def loss(step: int) -> LossOut:
        ce = F.cross_entropy(m(first[0]), first[1])
        return ce, {"ce": ce}

    tr.loss = loss
    return tr


def healthy_mlp_validated(g: torch.Generator) -> Training:
    """A shuffled loader, the same model and validation (twin of the repeated batch), at Adam lr 1e-3: at
    3e-3 one seed in three ends with its held-out loss 45 % above its minimum, which `overfitting` reports."""
    _seed_model(g)
    x, y = _teacher(g, n=4096)
    m = _mlp(16, 64, 2, nn.ReLU)
    return _classify(m, torch.optim.Adam(m.parameters(), lr=1e-3), g, data=(x, y), val=True, steps=160)


def mlp_dropout_keep_prob(g: torch.Generator) -> Training:
    """TensorFlow's ``keep_prob`` carried over to ``nn.Dropout(p)`` (StackOverflow, "Dropout in PyTorch:
    p is the probability of an element to be zeroed"): p=0.9 drops nine units in ten."""
    _seed_model(g)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.9), nn.Linear(64, 64), nn.ReLU(),
                      nn.Dropout(0.9), nn.Linear(64, 4))
    return _classify(m, torch.optim.Adam(m.parameters(), lr=1e-3), g, val=True)


def _imbalanced(g: torch.Generator, weights: str) -> Training:
    _seed_model(g)
    x = torch.randn(1024, 16, generator=g)
    score = x @ torch.randn(16, generator=g)
    y = (score > torch.quantile(score, 0.9)).long()  # 10 % positives
    counts = torch.bincount(y, minlength=2).float()
    w = counts / counts.sum() if weights == "inverted" else counts.sum() / (2 * counts)
    m = _mlp(16, 64, 2, nn.ReLU, out=2)
    return _classify(m, torch.optim.Adam(m.parameters(), lr=1e-3), g, data=(x, y),
                     loss_fn=lambda out, t: F.cross_entropy(out, t, weight=w))


def mlp_class_weights_inverted(g: torch.Generator) -> Training:
    """PyTorch forums, "CrossEntropyLoss weight for imbalanced classes" (the weight is inversely
    proportional to the class frequency): the frequencies themselves passed as weights make the rare
    class count 81x less, not 9x more."""
    return _imbalanced(g, "inverted")


def healthy_mlp_class_weights(g: torch.Generator) -> Training:
    """Inverse-frequency class weights, as the forum answer says."""
    return _imbalanced(g, "inverse")


def _regression(g: torch.Generator, broadcast: bool, summed: bool = False) -> Training:
    _seed_model(g)
    m = _mlp(8, 64, 2, nn.ReLU, out=1)
    opt = torch.optim.SGD(m.parameters(), lr=0.01 if summed else 0.05, momentum=0.9)
    x = torch.randn(2048, 8, generator=g)
    t = x[:, 0] - 0.5 * x[:, 1] + 0.25 * x[:, 2] * x[:, 3]
    xv, tv = x[1536:], t[1536:]

    def fit(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if broadcast:  # (N, 1) against (N,): an (N, N) matrix of every pair
            return F.mse_loss(out, target)
        if summed:
            return ((out.squeeze(1) - target) ** 2).sum()
        return F.mse_loss(out.squeeze(1), target)

    def loss(step: int) -> LossOut:
        idx = torch.randint(0, 1536, (256,), generator=g)
        mse = fit(m(x[idx]), t[idx])
        return mse, {"mse": mse}

    def validate() -> torch.Tensor:
        m.eval()
        with torch.no_grad():
            v = F.mse_loss(m(xv).squeeze(1), tv)  # the evaluation script has it right
        m.train()
        return v

    return Training(m, opt, loss, steps=150, every=2, val=validate, eval_every=10)


def regression_broadcast_target(g: torch.Generator) -> Training:
    """PyTorch's own UserWarning "Using a target size that is different to the input size ... will likely
    lead to incorrect results due to broadcasting", and "37 Reasons" #19 (loss input shapes): an output of
    shape (N, 1) against a target of shape (N,) fits every prediction to every target, so the model learns
    the mean and the loss plateaus at the target's variance."""
    return _regression(g, broadcast=True)


def regression_loss_summed(g: torch.Generator) -> Training:
    """CS231n notes and forum threads on ``reduction='sum'``: a squared error summed over a batch of 256,
    not averaged, multiplies the gradient by 256, and SGD at a rate tuned for the mean diverges."""
    return _regression(g, broadcast=False, summed=True)


def healthy_regression_mean(g: torch.Generator) -> Training:
    """The twin: outputs squeezed to (N,), the squared error averaged."""
    return _regression(g, broadcast=False)


# ===================================================================== CNN with BatchNorm
def healthy_cnn_eval_toggle(g: torch.Generator) -> Training:
    """model.eval() for validation under torch.no_grad(), model.train() again afterwards."""
    return _cnn_training(g)


def cnn_eval_never_undone(g: torch.Generator) -> Training:
    """PyTorch forums, "model.eval() vs model.train()": validation calls model.eval() and the loop never
    calls model.train() again, so after the first validation BatchNorm uses its running statistics and
    Dropout is off for the rest of training."""
    return _cnn_training(g, val_mode="never_undone")


def cnn_validation_in_train_mode(g: torch.Generator) -> Training:
    """PyTorch forums, "validation accuracy changes with batch size / forgot model.eval()": validation
    under torch.no_grad() with the model still in training mode, so BatchNorm normalises with the
    validation batch's statistics and updates its running averages with them, and Dropout stays on."""
    return _cnn_training(g, val_mode="train")


def cnn_no_zero_grad_adam(g: torch.Generator) -> Training:
    """The zero_grad() classic again (PyTorch forums), under Adam: each step's gradient is the sum of all
    the previous ones, so Adam follows an ever-longer running sum."""
    return _cnn_training(g, opt="adam", loop=_user_loop(zero_grad=False))


# ===================================================================== residual net
def _residual(g: torch.Generator, *, sched: str = "", eval_first: bool = False) -> Training:
    _seed_model(g)
    m = DropResidual()
    if eval_first:  # inference code copied above the training loop
        m.eval()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    s = None
    if sched == "per_batch":
        s = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.85)
    tr = _classify(m, opt, g, sched=s)
    if sched == "per_epoch":
        s = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.85)
        inner = tr.loss

        def loss(step: int) -> LossOut:
            if step and step % 20 == 0:
                s.step()
            return inner(step)

        tr.loss = loss
    return tr


def resnet_scheduler_per_batch(g: torch.Generator) -> Training:
    """PyTorch forums, "ExponentialLR stepped every iteration": ExponentialLR(gamma=0.85) meant per epoch,
    stepped per batch, takes the rate down ~3e8x in 120 steps and the loss freezes early."""
    return _residual(g, sched="per_batch")


def healthy_resnet_scheduler_per_epoch(g: torch.Generator) -> Training:
    """The same ExponentialLR stepped once per epoch (20 batches)."""
    return _residual(g, sched="per_epoch")


def resnet_eval_before_training(g: torch.Generator) -> Training:
    """PyTorch forums, "training in eval mode": the model is put in eval mode (inference code above the
    loop, or a checkpoint helper that calls .eval()) and trained so, with every Dropout off."""
    return _residual(g, eval_first=True)


def resnet_no_zero_grad(g: torch.Generator) -> Training:
    """The zero_grad() classic on a residual net with SGD momentum."""
    tr = _residual(g)
    tr.loop = _user_loop(zero_grad=False)
    for group in tr.opt.param_groups:
        group["lr"] = 0.005
    return tr


def healthy_resnet(g: torch.Generator) -> Training:
    """The residual net with dropout, its loop written right (twin of the eval-mode and zero_grad bugs)."""
    return _residual(g)


# ===================================================================== recurrent nets
class CharLM(nn.Module):
    """pytorch/examples' word_language_model in miniature: Embedding -> RNN/LSTM -> a linear decoder."""

    def __init__(self, cell: str = "rnn", vocab: int = 16, d: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = {"rnn": nn.RNN, "lstm": nn.LSTM}[cell](d, hidden, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.rnn(self.emb(t))[0])


def _rnn_lm(g: torch.Generator, cell: str, *, clip: Optional[float], lr: float = 20.0) -> Training:
    """Next token of noisy arithmetic sequences mod 16 (36 tokens), plain SGD at word_language_model's lr 20."""
    _seed_model(g)
    m = CharLM(cell)
    opt = torch.optim.SGD(m.parameters(), lr=lr)

    def loss(step: int) -> LossOut:
        start = torch.randint(0, 16, (16, 1), generator=g)
        stride = torch.randint(1, 4, (16, 1), generator=g)
        seq = (start + stride * torch.arange(36)) % 16
        seq = torch.where(torch.rand(16, 36, generator=g) < 0.1, torch.randint(0, 16, (16, 36), generator=g), seq)
        ce = F.cross_entropy(m(seq[:, :-1]).reshape(-1, 16), seq[:, 1:].reshape(-1))
        return ce, {"ce": ce}

    return Training(m, opt, loss, steps=100, every=2, loop=_user_loop(clip=clip))


def rnn_tanh_no_clip(g: torch.Generator) -> Training:
    """Pascanu et al., "On the difficulty of training recurrent neural networks", and issue 22's report on
    pytorch/examples' word_language_model with its ``--clip 0.25`` removed: a tanh RNN at SGD lr 20 whose
    gradient norm jumps 5-40x its median on a few batches."""
    return _rnn_lm(g, "rnn", clip=None)


def healthy_rnn_tanh_clipped(g: torch.Generator) -> Training:
    """word_language_model's own recipe: lr 20 with clip_grad_norm_ at 0.25."""
    return _rnn_lm(g, "rnn", clip=0.25)


def lstm_no_clip(g: torch.Generator) -> Training:
    """The same LM with an LSTM and no clipping (forums: "LSTM gradient norm spikes, loss jumps"): it
    learns, but its gradient norm jumps ~5-9x its median early in the run."""
    return _rnn_lm(g, "lstm", clip=None)


def healthy_lstm_clipped(g: torch.Generator) -> Training:
    """The LSTM with clip_grad_norm_ at 0.25."""
    return _rnn_lm(g, "lstm", clip=0.25)


def _padded(g: torch.Generator, padding_idx: Optional[int]) -> Training:
    """Variable-length sequences padded with token 0 to length 24; does the sequence hold a 3?"""
    _seed_model(g)
    m = SeqClassifier("lstm", padding_idx=padding_idx)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)

    def loss(step: int) -> LossOut:
        t = torch.randint(1, 10, (32, 24), generator=g)
        lengths = torch.randint(4, 25, (32, 1), generator=g)
        t = torch.where(torch.arange(24) < lengths, t, torch.zeros_like(t)).flip(1)  # left-padded
        ce = F.cross_entropy(m(t), (t == 3).any(1).long())
        return ce, {"ce": ce}

    return Training(m, opt, loss, steps=120, every=2)


def lstm_padding_embedding_trains(g: torch.Generator) -> Training:
    """PyTorch forums, "nn.Embedding padding_idx": sequences padded with index 0 into an Embedding built
    without ``padding_idx=0``, so the padding vector is trained like a word."""
    return _padded(g, None)


def healthy_lstm_padding_idx(g: torch.Generator) -> Training:
    """The same LSTM with ``nn.Embedding(..., padding_idx=0)``."""
    return _padded(g, 0)


# ===================================================================== small GPT
class _ProbGPT(TinyGPT):
    """TinyGPT whose forward returns probabilities (softmax added for sampling, and left in for training)."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return super().forward(t).softmax(-1)


def _gpt(g: torch.Generator, *, rebuild_head: str = "", softmax: bool = False, diag_first: bool = False,
         zero_grad: bool = True) -> Training:
    """The small GPT on arithmetic sequences mod 32, AdamW, warm-up + cosine, clip 1.0."""
    _seed_model(g)
    m = _ProbGPT() if softmax else TinyGPT()
    if rebuild_head == "before":
        m.head = nn.Linear(32, 32, bias=False)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.1)
    if rebuild_head == "after":  # re-initialised head: the optimizer still holds the old one
        m.head = nn.Linear(32, 32, bias=False)
    steps = 80
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

    def loss(step: int) -> LossOut:
        start = torch.randint(0, 32, (16, 1), generator=g)
        stride = torch.randint(1, 4, (16, 1), generator=g)
        seq = (start + stride * torch.arange(17)) % 32
        ce = F.cross_entropy(m(seq[:, :-1]).reshape(-1, 32), seq[:, 1:].reshape(-1))
        return ce, {"ce": ce}

    return Training(m, opt, loss, steps=steps, every=4, sched=sched,
                    loop=_user_loop(clip=1.0, diag_first=diag_first, zero_grad=zero_grad))


def healthy_gpt_loop(g: torch.Generator) -> Training:
    """nanoGPT's recipe with the head built before the optimizer (twin of the GPT bugs)."""
    return _gpt(g, rebuild_head="before")


def gpt_head_rebuilt_after_optimizer(g: torch.Generator) -> Training:
    """PyTorch forums, "new layer not updating / optimizer doesn't see the new layer": the LM head is
    re-created after ``AdamW(model.parameters())`` was built, so it gets gradients and never moves."""
    return _gpt(g, rebuild_head="after")


def gpt_softmax_into_cross_entropy(g: torch.Generator) -> Training:
    """The Softmax-then-CrossEntropy forum classic on a language model: ``.softmax(-1)`` added to the
    model's forward for sampling, so training passes probabilities to F.cross_entropy."""
    return _gpt(g, softmax=True)


def gpt_diag_step_before_backward(g: torch.Generator) -> Training:
    """Issue 22: ``diag.step()`` called before ``loss.backward()`` (the logging moved up with the loss
    print): the gradients it sees are the zeroed ones. The logger must say so at the call, and no finding
    may blame ``.detach()``."""
    return _gpt(g, rebuild_head="before", diag_first=True)


def gpt_no_zero_grad(g: torch.Generator) -> Training:
    """The zero_grad() classic in a nanoGPT-style loop (clipping at 1.0 hides the growing norm from
    the update, not from the gradients)."""
    return _gpt(g, rebuild_head="before", zero_grad=False)


# ===================================================================== fine-tuning, frozen backbone
def _finetune(g: torch.Generator, *, replace: str) -> Training:
    """A backbone pretrained (80 Adam steps, not logged) on the task, then frozen; a head trained on top."""
    _seed_model(g)
    m = _FrozenBackbone()
    x, y = _teacher(g, n=4096)
    pre = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(80):
        idx = torch.randint(0, 4096, (64,), generator=g)
        pre.zero_grad()
        F.cross_entropy(m(x[idx]), y[idx]).backward()
        pre.step()
    m.backbone.requires_grad_(False)
    if replace == "before":
        m.head = nn.Linear(64, 4)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    if replace == "after":  # a new head for the new classes, after the optimizer was built
        m.head = nn.Linear(64, 4)
    return _classify(m, opt, g, data=(x, y))


def finetune_head_replaced_after_optimizer(g: torch.Generator) -> Training:
    """PyTorch forums, "Finetuning: replaced the classifier but its weights don't change" and the
    transfer-learning tutorial's order (replace ``model.fc`` first, then build the optimizer): the head is
    replaced after the optimizer, which holds the old head's tensors; nothing is trained at all."""
    return _finetune(g, replace="after")


def healthy_finetune_head_replaced_before(g: torch.Generator) -> Training:
    """The tutorial's order: replace the head, then build the optimizer over the trainable tensors."""
    return _finetune(g, replace="before")


def finetune_scheduler_per_batch(g: torch.Generator) -> Training:
    """A fine-tuning recipe's ``StepLR(step_size=7, gamma=0.1)`` (the transfer-learning tutorial's, per
    epoch) stepped per batch."""
    tr = _finetune(g, replace="before")
    tr.sched = torch.optim.lr_scheduler.StepLR(tr.opt, step_size=7, gamma=0.1)
    return tr


# ===================================================================== AMP
def _amp(g: torch.Generator, *, unscale: bool = True, zero_grad: bool = True) -> Training:
    """bf16 autocast with a GradScaler and clip_grad_norm_ at 5.0 (the AMP recipe's loop)."""
    _seed_model(g)
    m = ResidualMLP(blocks=3)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    return _classify(m, opt, g, steps=80, every=4, scaler=torch.amp.GradScaler("cpu"), autocast=torch.bfloat16,
                     loop=_user_loop(unscale=unscale, zero_grad=zero_grad, clip=5.0))


def healthy_amp_unscale_then_clip(g: torch.Generator) -> Training:
    """PyTorch's AMP examples, "Working with unscaled gradients": scaler.unscale_(opt), then clip."""
    return _amp(g)


def amp_clip_scaled_gradients(g: torch.Generator) -> Training:
    """PyTorch AMP examples ("gradient clipping": unscale first) and forum threads on "loss not decreasing
    with GradScaler and clip_grad_norm_": clipping the *scaled* gradients (x65536) at 5.0 shrinks every
    step ~1e4x."""
    return _amp(g, unscale=False)


def amp_no_zero_grad(g: torch.Generator) -> Training:
    """The zero_grad() classic under AMP (the scaler's loop copied without its first line)."""
    return _amp(g, zero_grad=False)


# ===================================================================== the catalogue
_MISC_LR = ("loss_not_decreasing", "update_ratio", "underfitting")
_BLOWUP = ("exploding_gradient", "nonfinite", "update_ratio", "loss_diverged", "loss_spike", "weight_norm_growth",
           "dead_relu", "loss_not_decreasing", "gradient_spike", "vanishing_gradient", "saturated_activation",
           "logit_growth", "overfitting")
_CNN_BN = ("bn1", "bn2")
# Cause words shared by several bugs.
_PER_EPOCH = ("schedul", "per epoch|per batch|every batch|each batch")
_NOT_HELD = ("optimizer", "never updated|in no optimizer|not in the optimizer|after replacing")
_SPIKE = ("spike|jump|outlier", "clip")


def _catalogue() -> dict[str, Bug]:
    B = Bug
    bugs = [
        # ---- MLP
        B("healthy_mlp_loop", healthy_mlp_loop, family="mlp"),
        B("mlp_no_zero_grad", mlp_no_zero_grad, ("grad_not_reset",), allowed=_BLOWUP, cause=("zero_grad",),
          twin="healthy_mlp_loop", family="mlp"),
        B("mlp_lr_int_zero", mlp_lr_int_zero, ("lr_zero",), allowed=_MISC_LR, cause=("learning rate", "zero|is 0"),
          twin="healthy_mlp_loop", family="mlp"),
        B("mlp_scheduler_per_batch", mlp_scheduler_per_batch, ("lr_collapsed",), allowed=_MISC_LR,
          cause=_PER_EPOCH, twin="healthy_mlp_scheduler_per_epoch", family="mlp"),
        B("healthy_mlp_scheduler_per_epoch", healthy_mlp_scheduler_per_epoch, family="mlp"),
        B("mlp_warmup_exponential", mlp_warmup_exponential, ("lr_unbounded",), allowed=_BLOWUP,
          cause=("learning rate", "schedul|grow|exponential"), twin="healthy_mlp_warmup_capped", family="mlp"),
        B("healthy_mlp_warmup_capped", healthy_mlp_warmup_capped, family="mlp"),
        B("mlp_softmax_into_cross_entropy", mlp_softmax_into_cross_entropy, ("output_loss_mismatch",),
          {"output_loss_mismatch": ("4",)}, allowed=("loss_not_decreasing", "underfitting"),
          cause=("softmax", "logits|crossentropy|cross_entropy"), twin="healthy_mlp_log_softmax_nll", family="mlp"),
        B("healthy_mlp_log_softmax_nll", healthy_mlp_log_softmax_nll, family="mlp",
          note="bait: log-probabilities from nn.LogSoftmax into nll_loss"),
        B("mlp_sigmoid_into_bce_with_logits", mlp_sigmoid_into_bce_with_logits, ("output_loss_mismatch",),
          {"output_loss_mismatch": ("4",)}, allowed=("loss_not_decreasing", "underfitting"),
          cause=("sigmoid", "logits"), twin="healthy_mlp_bce_with_logits", family="mlp"),
        B("healthy_mlp_bce_with_logits", healthy_mlp_bce_with_logits, family="mlp"),
        B("mlp_unnormalised_inputs", mlp_unnormalised_inputs, ("inputs_not_normalised", "dead_relu"),
          allowed=_BLOWUP, cause=("input", "normalis|standardis"), twin="healthy_mlp_loop", family="mlp",
          note="the first updates, ~100x too large, kill the ReLUs; the input's recorded std (~100) names the cause"),
        B("mlp_labels_off_by_one", mlp_labels_off_by_one, ("loss_not_decreasing",),
          allowed=("underfitting", "overfitting"), twin="healthy_mlp_validated", family="mlp",
          beyond="which label belongs to which input: only the loss that does not fall shows"),
        B("mlp_repeated_batch", mlp_repeated_batch, ("overfitting",), allowed=("loss_not_decreasing",),
          twin="healthy_mlp_validated", family="mlp",
          beyond="the batches' contents: only the memorised training loss against the held-out one shows"),
        B("healthy_mlp_validated", healthy_mlp_validated, family="mlp"),
        B("mlp_dropout_keep_prob", mlp_dropout_keep_prob, (), allowed=("underfitting", "loss_not_decreasing"),
          twin="healthy_mlp_validated", family="mlp",
          beyond="Dropout's rate is not recorded, and the run still learns (slowly): nothing a rule can hold"),
        B("mlp_class_weights_inverted", mlp_class_weights_inverted, (), allowed=("loss_not_decreasing",),
          twin="healthy_mlp_class_weights", family="mlp",
          beyond="per-class errors are not recorded: the weighted loss falls as usual"),
        B("healthy_mlp_class_weights", healthy_mlp_class_weights, family="mlp"),
        B("regression_broadcast_target", regression_broadcast_target, ("loss_not_decreasing",),
          allowed=("underfitting",), twin="healthy_regression_mean", family="mlp",
          beyond="the loss's input shapes: only a loss stuck at the target's variance shows"),
        B("regression_loss_summed", regression_loss_summed, ("nonfinite",), allowed=_BLOWUP,
          twin="healthy_regression_mean", family="mlp",
          beyond="the loss's reduction: only the divergence it causes shows"),
        B("healthy_regression_mean", healthy_regression_mean, family="mlp"),
        # ---- CNN with BatchNorm
        B("healthy_cnn_eval_toggle", healthy_cnn_eval_toggle, family="cnn"),
        B("cnn_eval_never_undone", cnn_eval_never_undone, ("module_mode",), {"module_mode": _CNN_BN},
          allowed=("loss_not_decreasing", "overfitting", "dead_relu", "update_ratio"), cause=("train()",),
          twin="healthy_cnn_eval_toggle",
          family="cnn"),
        B("cnn_validation_in_train_mode", cnn_validation_in_train_mode, ("module_mode",),
          {"module_mode": _CNN_BN}, cause=("eval()",), twin="healthy_cnn_eval_toggle", family="cnn"),
        B("cnn_no_zero_grad_adam", cnn_no_zero_grad_adam, ("grad_not_reset",), allowed=_BLOWUP,
          cause=("zero_grad",), twin="healthy_cnn_eval_toggle", family="cnn"),
        # ---- residual
        B("healthy_resnet", healthy_resnet, family="residual"),
        B("resnet_scheduler_per_batch", resnet_scheduler_per_batch, ("lr_collapsed",), allowed=_MISC_LR,
          cause=_PER_EPOCH, twin="healthy_resnet_scheduler_per_epoch", family="residual"),
        B("healthy_resnet_scheduler_per_epoch", healthy_resnet_scheduler_per_epoch, family="residual"),
        B("resnet_eval_before_training", resnet_eval_before_training, ("module_mode",),
          {"module_mode": ("blocks.0.4", "blocks.3.4")}, allowed=("overfitting",), cause=("train()",),
          twin="healthy_resnet", family="residual"),
        B("resnet_no_zero_grad", resnet_no_zero_grad, ("grad_not_reset",), allowed=_BLOWUP,
          cause=("zero_grad",), twin="healthy_resnet", family="residual"),
        # ---- recurrent
        B("rnn_tanh_no_clip", rnn_tanh_no_clip, ("gradient_spike",), allowed=_BLOWUP, cause=_SPIKE,
          twin="healthy_rnn_tanh_clipped", family="rnn"),
        B("healthy_rnn_tanh_clipped", healthy_rnn_tanh_clipped, family="rnn"),
        B("lstm_no_clip", lstm_no_clip, ("gradient_spike",), allowed=_BLOWUP, cause=_SPIKE,
          twin="healthy_lstm_clipped", family="rnn"),
        B("healthy_lstm_clipped", healthy_lstm_clipped, family="rnn"),
        B("lstm_padding_embedding_trains", lstm_padding_embedding_trains, (), twin="healthy_lstm_padding_idx",
          family="rnn", beyond="which embedding rows are padding: the run trains and looks healthy"),
        B("healthy_lstm_padding_idx", healthy_lstm_padding_idx, family="rnn"),
        # ---- small GPT
        B("healthy_gpt_loop", healthy_gpt_loop, family="gpt"),
        B("gpt_head_rebuilt_after_optimizer", gpt_head_rebuilt_after_optimizer, ("not_in_optimizer",),
          {"not_in_optimizer": ("head.weight",)},
          allowed=("loss_not_decreasing", "underfitting", "gradient_clipping"),
          cause=_NOT_HELD, twin="healthy_gpt_loop", family="gpt"),
        B("gpt_softmax_into_cross_entropy", gpt_softmax_into_cross_entropy, ("output_loss_mismatch",),
          {"output_loss_mismatch": ("head",)}, allowed=("loss_not_decreasing", "gradient_clipping"),
          cause=("softmax", "logits|crossentropy|cross_entropy"), twin="healthy_gpt_loop", family="gpt"),
        B("gpt_diag_step_before_backward", gpt_diag_step_before_backward, (), warns=("backward",),
          twin="healthy_gpt_loop", family="gpt", note="no finding may fire: the warning at the call says it"),
        B("gpt_no_zero_grad", gpt_no_zero_grad, ("grad_not_reset",), allowed=_BLOWUP + ("gradient_clipping",),
          cause=("zero_grad",), twin="healthy_gpt_loop", family="gpt"),
        # ---- fine-tuning with a frozen backbone
        B("healthy_finetune_head_replaced_before", healthy_finetune_head_replaced_before, family="finetune"),
        B("finetune_head_replaced_after_optimizer", finetune_head_replaced_after_optimizer,
          ("not_in_optimizer",), {"not_in_optimizer": ("head.weight", "head.bias")},
          allowed=("loss_not_decreasing", "underfitting"), cause=_NOT_HELD,
          twin="healthy_finetune_head_replaced_before", family="finetune"),
        B("finetune_scheduler_per_batch", finetune_scheduler_per_batch, ("lr_collapsed",), allowed=_MISC_LR,
          cause=_PER_EPOCH, twin="healthy_finetune_head_replaced_before", family="finetune"),
        # ---- AMP
        B("healthy_amp_unscale_then_clip", healthy_amp_unscale_then_clip, family="amp"),
        B("amp_clip_scaled_gradients", amp_clip_scaled_gradients, ("gradient_clipping",),
          {"gradient_clipping": ("grad_norm_preclip",)}, allowed=("loss_not_decreasing", "update_ratio"),
          cause=("unscale",), twin="healthy_amp_unscale_then_clip", family="amp"),
        B("amp_no_zero_grad", amp_no_zero_grad, ("grad_not_reset",), allowed=_BLOWUP + ("gradient_clipping",),
          cause=("zero_grad",), twin="healthy_amp_unscale_then_clip", family="amp"),
    ]
    return {b.name: b for b in bugs}


BUGS: dict[str, Bug] = _catalogue()
HEALTHY: tuple[str, ...] = tuple(n for n, b in BUGS.items() if b.healthy)
BROKEN: tuple[str, ...] = tuple(n for n, b in BUGS.items() if not b.healthy)
