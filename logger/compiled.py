"""Activation capture for a ``torch.compile``'d model: module hooks that dynamo traces into the graph.

The eager capture (`activations.py`) enters a `TorchFunctionMode` and reads
Python frames, which a compiled graph cannot hold. Here each activation
module (``nn.ReLU``, ``nn.GELU``, ``nn.Tanh``, ...) gets a forward hook
instead. Dynamo inlines module hooks, so the hook's reductions (sum, L2
norm, per-unit maxima or the saturated count) become part of the compiled
graph and its ``records.append`` a side effect replayed after it. The hook
first reads one Python bool (`_Flag.armed`); dynamo guards on it, so there
are two graphs, one with the reductions for logged steps and one without
them for the others: one extra compilation, not one per step, and no graph
break (`tests/test_compiled.py` counts both).

Limits (README "Compiled models"): functional activations (``F.gelu(x)``
inside ``forward``) have no module to hook and are not captured; hooks must
be in place before the model's first compiled forward, since dynamo does not
guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``)
and keeps running a graph compiled without them.
"""

from __future__ import annotations

import fnmatch
from typing import Callable

import torch
from torch import nn

from tb_diag_logger import reductions
from tb_diag_logger.activations import ACTIVATION_MODULES, ActivationCapture, Site

# Logged steps in a row whose compiled forwards recorded nothing before the
# capture says its hooks are not in the graph.
_MISSES_BEFORE_WARNING = 2


class _Flag:
    """The one value the hooks read; dynamo guards on it and keeps a graph per value."""

    armed = False


def _kind(module: nn.Module) -> str:
    """The statistics a module's output gets, as in the eager capture (ReLU6 counts dead units)."""
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return "relu"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.Tanh):
        return "tanh"
    return "other"


def _hook(flag: _Flag, records: list, index: int, kind: str) -> Callable:
    """A forward hook that appends (site index, sum, norm, unit maxima or saturated count, numel) when armed."""

    def hook(module: nn.Module, args, output) -> None:
        if not flag.armed or not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            return None  # a step that is not logged, or an evaluation pass
        if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.numel() == 0:
            return None
        y = output.detach()
        total, norm = reductions.moments(y)
        extra = None
        if kind == "relu":
            extra = reductions.unit_max(y)
        elif kind in ("sigmoid", "tanh"):
            extra = reductions.saturated_count(y, kind)
        records.append((index, total, norm, extra, y.numel()))
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
        # Not ActivationCapture.__init__: no root hooks, no TorchFunctionMode. What
        # `totals()`, `close()` and `clear()` read is set here.
        self._on_error = on_error
        self._include, self._exclude = include, exclude
        self._flag = _Flag()
        self._records: list = []  # filled by the hooks, after each compiled forward
        self.sites: dict[str, Site] = {}
        self.order: list[str] = []
        self._site_list: list[Site] = []
        self._batches: list = []
        self._deferred: list = []
        self._deferred_numel = 0
        self._calls: dict = {}
        self._mode = None
        self._touched = False
        self._misses = 0
        self._handles = []
        for name, module in model.named_modules():
            if not isinstance(module, ACTIVATION_MODULES) or not self._selected(name):
                continue
            site = Site(name, _kind(module), type(module).__name__, name)
            self.sites[name] = site
            self.order.append(name)
            self._handles.append(
                module.register_forward_hook(_hook(self._flag, self._records, len(self._site_list), site.kind))
            )
            self._site_list.append(site)

    @property
    def armed(self) -> bool:
        return self._flag.armed

    @armed.setter
    def armed(self, value: bool) -> None:
        self._flag.armed = bool(value)

    def _selected(self, name: str) -> bool:
        if self._include and not any(fnmatch.fnmatchcase(name, p) for p in self._include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self._exclude)

    def take_forward_time(self) -> None:
        """No forward timing: a clock read inside the compiled region would break its graph."""
        return None

    def take(self) -> list[Site]:
        """Move the hooks' records into their sites; the sites seen since the last take, in stable order."""
        records = list(self._records)
        self._records.clear()
        if records:
            self._misses = 0
            self._touched = True
        elif self._handles:
            self._misses += 1
            if self._misses == _MISSES_BEFORE_WARNING:
                self._on_error(
                    "activation capture of the compiled model",
                    RuntimeError(
                        "its activation hooks did not run: the model was compiled before Diagnostics was "
                        "created (dynamo does not guard on module hooks). Create Diagnostics before the "
                        "first forward, or call torch._dynamo.reset() after creating it"
                    ),
                )
        for index, total, norm, extra, numel in records:
            site = self._site_list[index]
            site.count += int(numel)
            if site.kind == "relu":
                site._add_reduced(total, norm, extra, None)
            else:
                site._add_reduced(total, norm, None, extra)
        return [self.sites[n] for n in self.order if self.sites[n].seen]

    def clear(self) -> None:
        """Forget this step's records and statistics."""
        self._records.clear()
        super().clear()

    def close(self) -> None:
        """Disarm and remove every hook (the compiled graph keeps its copy until it recompiles)."""
        super().close()
        self._records.clear()
