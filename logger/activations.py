"""Activation capture: module activations and functional calls inside forward (the site statistics
themselves are in `site_stats.py`).

While a logged step's forward runs (the root module's hooks tell when), a
`TorchFunctionMode` sees every activation function call (`nn.ReLU` calls
`F.relu`, so module and functional activations take one path) and
attributes it to the innermost of the model's modules whose `forward` is on
the Python stack. On steps that are not logged the root's hooks return at
once and the mode is not active.
"""

from __future__ import annotations

import functools
import re
import sys
from types import CodeType, FrameType
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from tb_diag_logger import cost, hooks, reductions
from tb_diag_logger.site_stats import Batch, Site, SiteTotals, site_totals


def _forward_codes(model: nn.Module) -> dict[int, CodeType]:
    """id -> code object of the `forward` methods of the model's modules (and what they wrap).

    Keyed by id: hashing a code object hashes its contents, every time. The
    dict holds the code objects, so their ids stay theirs.
    """
    codes = {}
    for m in model.modules():
        for f in (getattr(type(m), "forward", None), vars(m).get("forward")):
            f = getattr(f, "__func__", f)
            while f is not None:
                code = getattr(f, "__code__", None)
                if code is not None:
                    codes[id(code)] = code
                f = getattr(f, "__wrapped__", None)
    return codes


def _activation_functions() -> dict[Callable, tuple[str, str]]:
    """Map each activation callable to (kind, canonical name).

    kind "relu" records dead units, "sigmoid"/"tanh" record saturation,
    "other" records mean and std only.
    """
    table = {
        "relu": ("relu", [F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_]),
        "relu6": ("relu", [F.relu6]),
        "sigmoid": ("sigmoid", [torch.sigmoid, torch.sigmoid_, torch.Tensor.sigmoid, torch.Tensor.sigmoid_, F.sigmoid]),
        "tanh": ("tanh", [torch.tanh, torch.tanh_, torch.Tensor.tanh, torch.Tensor.tanh_, F.tanh]),
        "gelu": ("other", [F.gelu]),
        "silu": ("other", [F.silu]),
        "leaky_relu": ("other", [F.leaky_relu, F.leaky_relu_]),
        "elu": ("other", [F.elu, F.elu_]),
        "mish": ("other", [F.mish]),
        "hardtanh": ("other", [F.hardtanh, F.hardtanh_]),  # nn.ReLU6 calls it (recorded as a ReLU, below)
    }
    out: dict[Callable, tuple[str, str]] = {}
    for name, (kind, funcs) in table.items():
        for f in funcs:
            out.setdefault(f, (kind, name))
    return out


ACTIVATION_FUNCTIONS = _activation_functions()

# Leaf modules that are themselves an activation: their call is named after
# the module ("features.2"), not "features.2.relu()".
ACTIVATION_MODULES = (
    nn.ReLU, nn.Hardtanh, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Mish,
)

# Modules outside torch.nn that build a smooth activation out of tanh or sigmoid
# (transformers' NewGELUActivation is 0.5x(1 + tanh(...)), QuickGELU x * sigmoid(1.702x)):
# the module's output is the site; the calls inside it are not (an inner tanh's
# saturation says nothing about a GELU).
_SMOOTH_ACTIVATION = re.compile(r"gelu|silu|swish|mish", re.IGNORECASE)


def is_smooth_activation(module: nn.Module) -> bool:
    """A GELU/SiLU-like activation module that torch.nn does not define (its output is one site)."""
    return not isinstance(module, ACTIVATION_MODULES) and bool(_SMOOTH_ACTIVATION.search(type(module).__name__))


# Outputs of at most this many elements are copied and reduced together when
# the step is logged, one stack per shape, instead of with ~6 torch calls each
# as they come: a model with many small activation sites (benchmarks/wide_model.py,
# 1,000 of them) spent most of its logged forward on those calls. They are
# copied because the model may change an output in place after the activation.
_DEFER_NUMEL = 4096
_DEFER_BUDGET = 1 << 22  # elements held at most (16 MB of float32); past it they are reduced at once


# Activations whose output autograd saves for the backward pass.
_SAVES_RESULT = frozenset({"relu", "sigmoid", "tanh"})
_UNKNOWN = object()

_MAX_BATCHES = 64  # batch records kept before they are folded into their sites
_MAX_CALLS = 256  # module calls remembered in a forward before the finished ones are dropped


class _CaptureMode(TorchFunctionMode):
    """Active only during a logged step's forward; routes activation calls to the capture."""

    def __init__(self, capture: ActivationCapture) -> None:
        super().__init__()
        self._capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        spec = ACTIVATION_FUNCTIONS.get(func)
        if spec is not None:
            self._capture.record(spec, out)
        return out


class ActivationCapture:
    """Owns the root's forward hooks, the capture mode and the per-site statistics."""

    def __init__(
        self,
        model: nn.Module,
        selected: Callable[[str], bool],
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        """`selected`: whether a site name is kept (the user's include/exclude, `collectors.Selection`)."""
        self._names = {id(m): n for n, m in model.named_modules()}
        self._codes = _forward_codes(model)
        self._selected = selected
        self._on_error = on_error
        self.armed = False
        self.sites: dict[str, Site] = {}
        self.order: list[str] = []  # first-seen order, stable across steps
        # Per call of a module in this forward: (its frame, activation calls so far by
        # function). The frame is held until the forward ends, so that its id stays its own.
        self._calls: dict[int, tuple[FrameType, dict[str, int]]] = {}
        self._mode: Optional[_CaptureMode] = None
        self._depth = 0  # nested calls of the root module running now, captured or not
        self._mode_depth = 0  # the depth at which the mode was entered: it is left below it
        self._root = model
        # Small outputs reduced in take(): (site, output, its version when kept or -1 for a copy).
        self._deferred: list[tuple[Site, torch.Tensor, int]] = []
        # (id(module), function, n-th call in a call of the module; 0: the activation module) -> site, or None
        # where it is excluded: names are built once.
        self._site_of: dict[tuple[int, str, int], Optional[Site]] = {}
        self._activation_module: dict[int, bool] = {}
        self._smooth_activation: dict[int, bool] = {}
        self._deferred_numel = 0
        self._batches: list[Batch] = []
        self._touched = False  # a site has data since the last clear()
        self._timing_start: Optional[float] = None
        self._forward_s = 0.0  # training forwards since the last take_forward_time()
        self._forward_captured = False
        # Only the root is hooked. The module that runs an activation is found
        # from the Python frames when the activation is called: module hooks
        # (even torch's global ones, installed for a logged forward only) send
        # every module call down a slow path, which cost benchmarks/wide_model.py
        # (2,000 modules) more per logged forward than its activations did.
        self._handles = [
            hooks.forward_pre_hook(model, self._pre),
            hooks.forward_hook(model, self._post, always_call=True),
        ]
        # A hand-built activation module's output has no function call to catch: a hook of its own
        # (a few modules, not every module).
        self._handles += [hooks.forward_hook(m, self._smooth_post) for m in model.modules() if
                          self._is_smooth_activation(m)]

    # -- hooks (return None: anything else would replace the module's output)
    def _pre(self, module: nn.Module, args) -> None:
        self._depth += 1
        if self._depth == 1:
            # Every training forward is timed (two clock reads): what capture adds is a logged
            # forward's time over the others' (`take_forward_time`).
            self._timing_start = cost.clock() if torch.is_grad_enabled() else None
        self._arm()
        return None

    def _arm(self) -> None:
        """Enter the mode at the outermost entry of a logged training forward (`self._depth` already counts it)."""
        if not self.armed:
            return None
        try:
            if self._mode is not None:
                return None  # a nested call of the root: already captured
            if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
                return None  # an evaluation pass: not training statistics
            self._mode = _CaptureMode(self)
            self._mode.__enter__()
            self._calls.clear()
            self._mode_depth = self._depth
        except Exception as e:  # never into the training loop
            self._on_error("activation hook", e)
        return None

    def _post(self, module: nn.Module, args, output) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and self._timing_start is not None:
            self._forward_s += cost.clock() - self._timing_start
            self._forward_captured = self._forward_captured or self._mode is not None
            self._timing_start = None
        self._disarm()
        return None

    def _disarm(self) -> None:
        """Leave the mode when the entry that entered it returns (`self._depth` already counts it out)."""
        if self._mode is None or self._depth >= self._mode_depth:
            return None
        try:
            self._exit_mode()
        except Exception as e:
            self._on_error("activation hook", e)
        return None

    def wrap_entry(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn`, a bound method of the root module that training calls instead of its `forward` (a
        LightningModule's `training_step`), made an entry like the root's forward: capture is armed
        around it, and activation calls in its own body are attributed to the root. Not timed for the
        cost meter: it may hold more than a forward (backward and the optimizer step, in Lightning's
        manual optimisation)."""
        func = getattr(fn, "__func__", fn)
        code = getattr(func, "__code__", None)
        if code is not None:
            self._codes[id(code)] = code

        @functools.wraps(fn)
        def entry(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            self._arm()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth = max(0, self._depth - 1)
                try:
                    self._disarm()
                except Exception as e:
                    self._on_error("activation hook", e)

        return entry

    def take_forward_time(self) -> Optional[tuple[float, bool]]:
        """(seconds of the training forwards since the last call, whether one was captured), or None if none ran."""
        if not self._forward_s:
            return None
        out = (self._forward_s, self._forward_captured)
        self._forward_s, self._forward_captured = 0.0, False
        return out

    def _exit_mode(self) -> None:
        mode, self._mode = self._mode, None
        self._calls.clear()
        if mode is not None:
            mode.__exit__(None, None, None)

    def _caller(self) -> Optional[tuple[nn.Module, dict[str, int]]]:
        """The innermost call of one of this model's modules on the Python stack, with its activation counts."""
        frame = sys._getframe(3)  # above _caller, record and _CaptureMode.__torch_function__
        codes, names = self._codes, self._names
        while frame is not None:
            code = frame.f_code
            if id(code) in codes and code.co_argcount:
                module = frame.f_locals.get(code.co_varnames[0])
                if module is not None and id(module) in names:
                    call = self._calls.get(id(frame))
                    if call is None:
                        if len(self._calls) >= _MAX_CALLS:
                            self._forget_finished_calls(frame)
                        call = self._calls[id(frame)] = (frame, {})
                    return module, call[1]
            frame = frame.f_back
        return None

    def _forget_finished_calls(self, frame: FrameType) -> None:
        """Drop the calls whose frames are no longer on the stack: they record nothing more, and
        their frames (with their locals) need not wait for the end of the forward."""
        live = set()
        while frame is not None:
            live.add(id(frame))
            frame = frame.f_back
        self._calls = {k: v for k, v in self._calls.items() if k in live}

    # -- recording
    def record(self, spec: tuple[str, str], out) -> None:
        """Attribute one activation call to the innermost of the model's modules running and add its output."""
        try:
            kind, fname = spec
            caller = self._caller()
            if caller is None:
                return
            module, counts = caller
            if self._is_smooth_activation(module):
                return  # the module's own output is the site (`_smooth_post`)
            if not counts and self._is_activation_module(module):
                counts[fname] = 1
                key = (id(module), fname, 0)  # named after the module itself
            else:
                n = counts.get(fname, 0) + 1
                counts[fname] = n
                key = (id(module), fname, n)
            site = self._site_of.get(key, _UNKNOWN)
            if site is _UNKNOWN:
                site = self._site_of[key] = self._new_site(module, kind, fname, key[2])
            if site is None:
                return  # excluded
            self._touched = True
            self._add(site, out, fname in _SAVES_RESULT)
        except Exception as e:
            self._on_error("activation capture", e)

    def _is_activation_module(self, module: nn.Module) -> bool:
        hit = self._activation_module.get(id(module))
        if hit is None:
            hit = self._activation_module[id(module)] = isinstance(module, ACTIVATION_MODULES)
        return hit

    def _is_smooth_activation(self, module: nn.Module) -> bool:
        hit = self._smooth_activation.get(id(module))
        if hit is None:
            hit = self._smooth_activation[id(module)] = is_smooth_activation(module)
        return hit

    def _smooth_post(self, module: nn.Module, args, output) -> None:
        """The output of a GELU/SiLU-like module, during a captured forward: a site named after the module."""
        if self._mode is None or not isinstance(output, torch.Tensor):
            return None
        try:
            key = (id(module), "output", 0)
            site = self._site_of.get(key, _UNKNOWN)
            if site is _UNKNOWN:
                site = self._site_of[key] = self._new_site(module, "other", "output", 0)
            if site is not None:
                self._touched = True
                self._add(site, output)
        except Exception as e:  # never into the training loop
            self._on_error("activation capture", e)
        return None

    def _new_site(self, module: nn.Module, kind: str, fname: str, n: int) -> Optional[Site]:
        """The site of the n-th call of `fname` in a call of `module` (n = 0: the activation module itself)."""
        mod_name = self._names[id(module)]
        if n == 0:
            name, type_name = mod_name, type(module).__name__
            if isinstance(module, nn.ReLU6):  # F.hardtanh(x, 0, 6): dead units make sense
                kind = "relu"
        else:
            base = f"{mod_name}.{fname}()" if mod_name else f"{fname}()"
            name = base if n == 1 else f"{base}#{n}"
            type_name = f"F.{fname}"
        if not self._selected(name):
            return None
        site = self.sites.get(name)
        if site is None:
            site = self.sites[name] = Site(name, kind, type_name, mod_name)
            self.order.append(name)
        return site

    def _add(self, site: Site, y, saves_result: bool = False) -> None:
        """A small output is kept for `take()` to reduce with the others of its shape; a big one is reduced now.

        A small output is copied, since the model may change it in place
        before step(), unless autograd saved it for the backward pass (the
        output of relu, sigmoid or tanh of a tensor that requires grad): then
        changing it in place fails the backward, and its version counter,
        checked in `take()`, tells if it happened anyway.
        """
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            return
        n = y.numel()
        if n == 0 or n > _DEFER_NUMEL:
            site.add(y)
            return
        if saves_result and y.requires_grad:
            self._deferred.append((site, y, y._version))
        else:
            self._deferred.append((site, y.detach().clone(), -1))
        site.count += n
        site.seen = True
        self._deferred_numel += n
        if self._deferred_numel > _DEFER_BUDGET:
            self._reduce_deferred()

    def _reduce_deferred(self) -> None:
        """Reduce the copied small outputs: one stack and a few reductions per (shape, dtype, device).

        A statistic that fails loses only its sites for this step (reported once), as when
        it fails for one call on the way in.
        """
        items, self._deferred, self._deferred_numel = self._deferred, [], 0
        groups: dict[tuple, list[tuple[Site, torch.Tensor]]] = {}
        changed: list[Site] = []
        for site, y, version in items:
            if version >= 0 and y._version != version:
                changed.append(site)
                continue
            groups.setdefault((tuple(y.shape), y.dtype, y.device), []).append((site, y))
        if changed:
            self._on_error(
                "activation capture",
                RuntimeError(f"the output of {changed[0].name} was changed in place before step(); "
                             "its statistics are left out of this step"),
            )
            gone = {id(site) for site in changed}
            groups = {k: kept for k, v in groups.items() if (kept := [m for m in v if id(m[0]) not in gone])}
            for site in changed:
                site.clear()
        with torch.no_grad():
            for members in groups.values():
                self._reduce_group([m[0] for m in members], [m[1] for m in members])

    def _reduce_group(self, sites: list[Site], outputs: list[torch.Tensor]) -> None:
        n = len(sites)
        try:
            x = torch.stack(outputs)  # [G, *shape]
            flat = x.reshape(n, -1)
            batch = Batch(
                sites,
                flat.sum(dim=1, dtype=torch.float32),
                torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32),
                None,
                {},
            )
        except Exception as e:
            self._on_error("activation capture", e)
            for site in sites:
                site.clear()
            return
        failed: set[int] = set()
        kinds = {site.kind for site in sites}
        if "relu" in kinds:
            try:
                batch.unit_max = reductions.unit_max(x, stacked=True)
            except Exception as e:
                self._on_error("activation capture", e)
                failed.update(i for i, site in enumerate(sites) if site.kind == "relu")
        for kind in ("sigmoid", "tanh"):
            if kind in kinds:
                try:
                    batch.saturated[kind] = reductions.saturated_count(flat, kind, dim=1)
                except Exception as e:
                    self._on_error("activation capture", e)
                    failed.update(i for i, site in enumerate(sites) if site.kind == kind)
        if failed:  # rare: those sites are missing this step
            keep = [i for i in range(n) if i not in failed]
            rows = torch.tensor(keep, device=batch.sums.device, dtype=torch.long)
            batch = Batch(
                [sites[i] for i in keep], batch.sums[rows], batch.norms[rows],
                None if batch.unit_max is None else batch.unit_max[rows],
                {k: v[rows] for k, v in batch.saturated.items()},
            )
            for i in failed:
                sites[i].clear()
        if batch.sites:
            self._batches.append(batch)
        if len(self._batches) > _MAX_BATCHES:  # many forwards between step() calls: stay bounded
            self._fold_batches()

    def _fold_batches(self) -> None:
        """Move the batch records into their sites' own lists (slow, one view per call; rare)."""
        batches, self._batches = self._batches, []
        for b in batches:
            sums, norms = b.sums.unbind(), b.norms.unbind()
            unit_max = b.unit_max.unbind() if b.unit_max is not None else None
            for i, site in enumerate(b.sites):
                sat = b.saturated.get(site.kind)
                site.add_reduced(
                    sums[i], norms[i], unit_max[i] if unit_max is not None and site.kind == "relu" else None,
                    sat[i] if sat is not None else None,
                )

    def totals(self, sites: list[Site], device: torch.device) -> SiteTotals:
        """Every statistic of `sites` (from `take()`) combined (see `site_totals`)."""
        return site_totals(sites, self._batches, device)

    def take(self) -> list[Site]:
        """The sites seen since the last take, in stable order."""
        self._reduce_deferred()
        return [self.sites[n] for n in self.order if self.sites[n].seen]

    def clear(self) -> None:
        """Forget every site's statistics (after a step; nothing to do after a forward that was not captured)."""
        if not self._touched:
            return  # every step calls this: clearing a thousand untouched sites is a loop for nothing
        self._touched = False
        self._deferred, self._deferred_numel = [], 0
        self._batches = []
        for s in self.sites.values():
            s.clear()

    def close(self) -> None:
        """Leave the mode if it is active and remove every hook."""
        self.armed = False
        self._exit_mode()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._deferred, self._deferred_numel = [], 0
        self._batches = []
        self.sites.clear()
