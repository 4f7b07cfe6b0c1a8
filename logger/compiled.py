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

from typing import Any, Callable, Optional

import torch
from torch import nn

from tb_diag_logger import hooks, reductions
from tb_diag_logger.activations import ACTIVATION_MODULES, is_smooth_activation
from tb_diag_logger.site_stats import Site, SiteTotals, site_totals

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


class CompiledCapture:
    """The compiled model's activation capture: the same sites, names and totals as `ActivationCapture`,
    from traced module hooks (no root timing hooks, no TorchFunctionMode, no small-output batches)."""

    def __init__(
        self,
        model: nn.Module,
        selected: Callable[[str], bool],
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        """`selected`: whether a site name is kept (the user's include/exclude, `collectors.Selection`)."""
        self._on_error = on_error
        self._flag = _Flag()
        self.sites: dict[str, Site] = {}
        self.order: list[str] = []
        self._accums: list[tuple[Site, _Accum]] = []
        self._touched = False  # a site has data since the last clear()
        self._dirty = False  # armed since the last clear(): the accumulators may hold data
        self._misses = 0
        self._handles = []
        self._guards: Optional[bool] = None  # dynamo's setting before we changed it, restored at close()
        for name, module in model.named_modules():
            if not (isinstance(module, ACTIVATION_MODULES) or is_smooth_activation(module)) or not selected(name):
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
            self._guards = torch._dynamo.config.skip_nnmodule_hook_guards
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

    def wrap_entry(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` itself: the module hooks need no entry to arm them (see `ActivationCapture.wrap_entry`)."""
        return fn

    def totals(self, sites: list[Site], device: torch.device) -> SiteTotals:
        """Every statistic of `sites` (from `take()`) combined."""
        return site_totals(sites, [], device)

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
                    site.add_reduced(acc.total, norm, acc.extra, None)
                else:
                    site.add_reduced(acc.total, norm, None, acc.extra)
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
        if self._touched:
            self._touched = False
            for site in self.sites.values():
                site.clear()

    def close(self) -> None:
        """Disarm, remove every hook and give dynamo its setting back (a compiled graph keeps its copy of
        the hooks, disarmed, until it recompiles)."""
        self.armed = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for _, acc in self._accums:
            acc.__init__()
        self.sites.clear()
        if self._guards is not None:
            torch._dynamo.config.skip_nnmodule_hook_guards, self._guards = self._guards, None
