"""Activation capture for a ``torch.compile``'d model: module hooks that dynamo traces into the graph.

The eager capture (`activations.py`) enters a `TorchFunctionMode` and reads
Python frames, which a compiled graph cannot hold. Here each activation
module (``nn.ReLU``, ``nn.GELU``, ``nn.Tanh``, ...) gets a forward hook
instead. Dynamo inlines module hooks, so the hook's reductions (sum, L2
norm, per-unit maxima or the saturated count) become part of the compiled
graph, and storing them on the site's accumulator a side effect replayed
after it. The hook first reads one Python bool (`_Flag.armed`); dynamo
guards on it, so there are two graphs, one with the reductions for logged
steps and one without them for the others (a third under gradient
accumulation, for the micro-batches after the first): a bounded number of
compilations, not one per step, and no graph break (`tests/test_compiled.py`
counts both).

Dynamo does not guard on module hooks by default: a graph compiled before
the hooks existed, or for another instance of the same class, would be run
without them. The capture turns those guards on
(``torch._dynamo.config.skip_nnmodule_hook_guards = False``, for the process).

Limits (README "Compiled models"): functional activations (``F.gelu(x)``
inside ``forward``) have no module to hook and are not captured; a graph
compiled before ``Diagnostics`` existed keeps running without the hooks
(reported once).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tb_diag_logger import hooks, reductions
from tb_diag_logger.activations import ACTIVATION_MODULES, ActivationCapture, Site, is_smooth_activation

# Logged steps in a row whose compiled forwards recorded nothing before the
# capture says its hooks are not in the graph.
_MISSES_BEFORE_WARNING = 2


class _Flag:
    """The value the hooks read: dynamo guards on `armed` and keeps a graph per value."""

    armed = False


class _Accum:
    """One site's running statistics since the last step, as device tensors the hooks replace (or None)."""

    __slots__ = ("total", "squares", "count", "extra")

    def __init__(self) -> None:
        self.total = self.squares = self.count = self.extra = None


def _kind(module: nn.Module) -> str:
    """The statistics a module's output gets, as in the eager capture (ReLU6 counts dead units)."""
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return "relu"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.Tanh):
        return "tanh"
    return "other"


def _hook(flag: _Flag, acc: _Accum, kind: str) -> Callable:
    """A forward hook that, when armed, folds the output's reductions into `acc`.

    New tensors are assigned to `acc`'s attributes rather than appended to a
    list: dynamo guards on a list's length when it appends, which would make
    one graph per micro-batch under gradient accumulation; here the guards
    see only whether `acc` is empty (two armed graphs at most).
    """

    def hook(module: nn.Module, args, output) -> None:
        # Grad mode is off under inference_mode too (is_inference_mode_enabled() would break the graph).
        if not flag.armed or not torch.is_grad_enabled():
            return None  # a step that is not logged, or an evaluation pass
        if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.numel() == 0:
            return None
        y = output.detach()
        total, norm = reductions.moments(y)
        count = torch.full((), y.numel(), dtype=torch.float64, device=y.device)
        extra = None
        if kind == "relu":
            extra = reductions.unit_max(y)
        elif kind in ("sigmoid", "tanh"):
            extra = reductions.saturated_count(y, kind)
        if acc.total is None:
            acc.total, acc.squares, acc.count, acc.extra = total, norm * norm, count, extra
        else:
            acc.total, acc.squares, acc.count = acc.total + total, acc.squares + norm * norm, acc.count + count
            if kind == "relu":
                if acc.extra.shape == extra.shape:  # a site whose unit count changes keeps its first layout
                    acc.extra = torch.maximum(acc.extra, extra)
            elif extra is not None:
                acc.extra = acc.extra + extra
        return None  # anything else would replace the module's output

    return hook


class CompiledCapture(ActivationCapture):
    """`ActivationCapture` for compiled models: the same sites, names and totals, from traced module hooks."""

    def __init__(
        self,
        model: nn.Module,
        include: tuple[str, ...],
        exclude: tuple[str, ...],
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        # Not ActivationCapture.__init__: no root timing hooks, no TorchFunctionMode. What
        # `totals()`, `close()` and `clear()` read is set here.
        self._on_error = on_error
        self._include, self._exclude = include, exclude
        self._flag = _Flag()
        self.sites: dict[str, Site] = {}
        self.order: list[str] = []
        self._accums: list[tuple[Site, _Accum]] = []
        self._batches: list = []
        self._deferred: list = []
        self._deferred_numel = 0
        self._calls: dict = {}
        self._mode = None
        self._touched = False
        self._dirty = False  # armed since the last clear(): the accumulators may hold data
        self._misses = 0
        self._handles = []
        for name, module in model.named_modules():
            if not (isinstance(module, ACTIVATION_MODULES) or is_smooth_activation(module)) or not self._selected(name):
                continue
            site = Site(name, _kind(module), type(module).__name__, name)
            self.sites[name] = site
            self.order.append(name)
            acc = _Accum()
            self._handles.append(hooks.forward_hook(module, _hook(self._flag, acc, site.kind)))
            self._accums.append((site, acc))
        if self._handles:
            # By default dynamo does not guard on module hooks: a graph compiled before the hooks existed,
            # or for another instance of the same class, would run without them (or with that one's).
            torch._dynamo.config.skip_nnmodule_hook_guards = False

    @property
    def armed(self) -> bool:
        return self._flag.armed

    @armed.setter
    def armed(self, value: bool) -> None:
        self._flag.armed = bool(value)
        self._dirty = self._dirty or self._flag.armed

    def take_forward_time(self) -> None:
        """No forward timing: a clock read inside the compiled region would break its graph."""
        return None

    def take(self) -> list[Site]:
        """Move the accumulators into their sites; the sites seen since the last take, in stable order."""
        full = [(site, acc) for site, acc in self._accums if acc.total is not None]
        self._check_hooks_ran(bool(full))
        if full:
            self._touched = True
            counts = torch.stack([acc.count for _, acc in full]).tolist()  # one transfer for every site
            for (site, acc), count in zip(full, counts):
                site.count += int(count)
                norm = acc.squares.sqrt()
                if site.kind == "relu":
                    site._add_reduced(acc.total, norm, acc.extra, None)
                else:
                    site._add_reduced(acc.total, norm, None, acc.extra)
                acc.__init__()
        return [self.sites[n] for n in self.order if self.sites[n].seen]

    def _check_hooks_ran(self, recorded: bool) -> None:
        """Say once when two logged steps in a row recorded nothing from any hooked module."""
        if recorded or not self._handles:
            self._misses = 0
            return
        self._misses += 1
        if self._misses == _MISSES_BEFORE_WARNING:
            self._on_error(
                "activation capture of the compiled model",
                RuntimeError(
                    "no activation module recorded anything on two logged steps: they do not run in a training "
                    "forward, or the model was compiled before Diagnostics was created (a graph compiled without "
                    "the hooks). Create Diagnostics before the first forward, or call torch._dynamo.reset() "
                    "after creating it"
                ),
            )

    def clear(self) -> None:
        """Forget this step's statistics (nothing to do when no forward was armed since the last clear)."""
        if self._dirty:
            self._dirty = self._flag.armed
            for _, acc in self._accums:
                acc.__init__()
        super().clear()

    def close(self) -> None:
        """Disarm and remove every hook (a compiled graph keeps its copy, disarmed, until it recompiles)."""
        super().close()
        for _, acc in self._accums:
            acc.__init__()
