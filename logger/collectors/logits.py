"""Output-logit growth: `logit_max_abs` and `logit_lse` of the model's output, on logged steps only;
`logit_min`, `logit_max` and `logit_rowsum_dev` (max over rows of |row sum - 1|) say whether the output
is already squashed (sigmoid outputs in [0, 1], softmax rows summing to 1) before a loss that squashes it.

The logits are the root module's output: a tensor, the `.logits` of a
Hugging Face `ModelOutput` (or a dict's ``"logits"``), or the first float
tensor of a tuple such as nanoGPT's ``(logits, loss)``. They are recorded
under the name of the head that produced them: the last module (in module
order) with ``out_features`` equal to the logits' last dimension (an LM's
``lm_head``, a classifier's last ``nn.Linear``), else the last module with
parameters of its own. One forward hook on the root returns at once unless
the activation capture is armed for a logged step; training forwards only.

A root whose parameters all belong to one child (a LightningModule's
``self.net``) may be trained through that child alone (``self.net(x)`` in
``training_step``): the root's forward never runs, so the child's output is
taken instead, only when no root forward is under way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn

from tb_diag_logger import hooks
from tb_diag_logger.collectors import Collector, Part
from tb_diag_plugin import metadata

MAX_ABS, LSE = metadata.LOGIT_METRICS
LOGIT_MIN, LOGIT_MAX, ROWSUM_DEV = metadata.LOGIT_RANGE_METRICS


def logits_of(output: Any) -> Optional[torch.Tensor]:
    """The logits in a forward's output (see the module docstring), or None."""
    if isinstance(output, torch.Tensor):
        found = output
    elif isinstance(getattr(output, "logits", None), torch.Tensor):
        found = output.logits
    elif isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        found = output["logits"]
    elif isinstance(output, (tuple, list)):
        found = next((t for t in output if isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim), None)
    else:
        found = None
    if found is None or not found.is_floating_point() or found.ndim == 0 or found.numel() == 0:
        return None
    return found


def head_name(model: nn.Module, width: int) -> str:
    """The qualified name of the module that most likely produced logits of last dimension `width`."""
    last_with_params = ""
    head = None
    for name, m in model.named_modules():
        if getattr(m, "out_features", None) == width:
            head = name
        if next(m.parameters(recurse=False), None) is not None:
            last_with_params = name
    return head if head is not None else last_with_params


def sole_child(model: nn.Module) -> Optional[nn.Module]:
    """The one direct child of `model` that holds every parameter it has, or None (parameters of its own,
    or in two children)."""
    if next(model.parameters(recurse=False), None) is not None:
        return None
    holders = [c for c in model.children() if next(c.parameters(), None) is not None]
    return holders[0] if len(holders) == 1 else None


def _compiling() -> bool:
    """Inside a graph dynamo traces (`model.compile()` in place): no logits, rather than a graph break."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None) or torch._dynamo.is_compiling
    return bool(check())


class LogitCapture(Collector):
    """Owns the root's forward hook and the logged step's running logit statistics."""

    def __init__(self, model: nn.Module, armed: Callable[[], bool], on_error: Callable[[str, BaseException], None],
                 hook_on: Optional[nn.Module] = None):
        """`model` names the head; `hook_on` (default: `model`) is where the forward hook goes, e.g. a
        compiled wrapper, whose hooks run outside the graph."""
        self._model = model
        self._armed = armed
        self._on_error = on_error
        self._names: dict[int, str] = {}  # last dimension -> head name
        # head -> [max |logit|, sum of row LSEs, rows, min, max, max |row sum - 1|]
        self._stats: dict[str, list[torch.Tensor]] = {}
        self._handles = [hooks.forward_hook(model if hook_on is None else hook_on, self._post)]
        self._in_root = False  # a root forward is under way: its output, not its child's, is the logits
        # (a compiled wrapper's child runs inside its graph: no hook there)
        inner = sole_child(model) if hook_on is None or hook_on is model else None
        if inner is not None:
            self._handles += [hooks.forward_pre_hook(model, self._enter), hooks.forward_hook(inner, self._inner)]

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._in_root = True
        return None

    def _inner(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._in_root:  # trained through the child alone
            self._post(module, args, output)
        return None

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._in_root = False
        if _compiling() or not self._armed() or not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            return None  # not a logged step's training forward
        try:
            y = logits_of(output)
            if y is not None:
                with torch.no_grad():
                    self._add(y.detach())
        except Exception as e:  # never into the training loop
            self._on_error("logit statistics", e)
        return None

    def _add(self, y: torch.Tensor) -> None:
        width = y.shape[-1]
        name = self._names.get(width)
        if name is None:
            name = self._names[width] = head_name(self._model, width)
        lo, hi = torch.aminmax(y)
        lo, hi = lo.to(torch.float32), hi.to(torch.float32)
        biggest = torch.maximum(hi, -lo)
        y32 = y.to(torch.float32)
        lse = torch.logsumexp(y32, dim=-1).sum()
        # Rows that already sum to 1 are probabilities (a softmax head): ~0 here.
        rowsum_dev = (y32.sum(dim=-1) - 1).abs().amax()
        rows = torch.tensor(float(y.numel() // width), device=y.device)
        old = self._stats.get(name)
        if old is None:
            self._stats[name] = [biggest, lse, rows, lo, hi, rowsum_dev]
        else:  # several forwards before step(): gradient accumulation
            self._stats[name] = [
                torch.maximum(old[0], biggest), old[1] + lse, old[2] + rows,
                torch.minimum(old[3], lo), torch.maximum(old[4], hi), torch.maximum(old[5], rowsum_dev),
            ]

    def parts(self, step: int) -> list[Part]:
        """`MAX_ABS`, `LSE` (mean LSE per row), `LOGIT_MIN`, `LOGIT_MAX` and `ROWSUM_DEV` (max over rows of
        |row sum - 1|) per head of this step's forwards (the writing rank's batch)."""
        stats, self._stats = self._stats, {}
        self._in_root = False  # no forward is under way at step(): a root forward that raised is over
        if not stats:
            return []
        device = self.ctx.device
        names = list(stats)
        biggest = torch.stack([stats[n][0].to(device) for n in names])
        lse = torch.stack([(stats[n][1] / stats[n][2]).to(device) for n in names])
        extra = [
            Part(metric, names, torch.stack([stats[n][k].to(device) for n in names]))
            for k, metric in ((3, LOGIT_MIN), (4, LOGIT_MAX), (5, ROWSUM_DEV))
        ]
        return [Part(MAX_ABS, names, biggest), Part(LSE, names, lse), *extra]

    def clear(self) -> None:
        """Forget what this step's forwards left (a step that was not logged)."""
        self._stats = {}
        self._in_root = False

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stats = {}
