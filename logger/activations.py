"""Activation capture: module activations and functional calls inside forward.

Forward pre/post hooks on the model's own modules keep a stack of the module
being run; while a logged step's forward runs, a `TorchFunctionMode` sees
every activation function call (`nn.ReLU` calls `F.relu`, so module and
functional activations take one path) and attributes it to the module on top
of the stack. On steps that are not logged the hooks return at once and the
mode is not active.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.overrides import TorchFunctionMode

from tb_diag_logger import reductions


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


_MAX_PENDING = 64  # per-call statistics a site keeps before folding them into one


@dataclass
class Site:
    """Statistics of one activation site, accumulated over a logged step's forwards.

    Each call adds two or three small device tensors (sum, L2 norm, and the
    per-unit maxima or the saturated count); they are combined for all
    sites at once when the step is logged (`distributed.finish_sites`).
    """

    name: str
    kind: str
    type_name: str
    module: str = ""  # qualified name of the module that ran it
    sums: list = field(default_factory=list)
    norms: list = field(default_factory=list)
    saturated: list = field(default_factory=list)
    count: int = 0
    unit_max: Optional[torch.Tensor] = None
    seen: bool = False

    def add(self, y: torch.Tensor) -> None:
        """Add one call's output (ignored unless a non-empty float tensor)."""
        if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.numel() == 0:
            return
        y = y.detach()
        total, norm = reductions.moments(y)
        self.sums.append(total)
        self.norms.append(norm)
        self.count += y.numel()
        if self.kind == "relu":
            um = reductions.unit_max(y)
            if self.unit_max is None:
                self.unit_max = um
            elif self.unit_max.shape == um.shape:
                self.unit_max = torch.maximum(self.unit_max, um)
            # A site whose unit count changes between calls keeps its first
            # shape: per-unit identity is lost, the moments still add up.
        elif self.kind in ("sigmoid", "tanh"):
            self.saturated.append(reductions.saturated_count(y, self.kind))
        self.seen = True
        if len(self.sums) >= _MAX_PENDING:  # many forwards between step() calls: stay bounded
            self._fold()

    def _fold(self) -> None:
        self.sums = [torch.stack(self.sums).sum()]
        self.norms = [torch.linalg.vector_norm(torch.stack(self.norms))]
        if self.saturated:
            self.saturated = [torch.stack(self.saturated).sum()]

    def clear(self) -> None:
        """Forget this step's statistics (the site and its name stay)."""
        self.sums, self.norms, self.saturated = [], [], []
        self.count = 0
        self.unit_max = None
        self.seen = False


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
    """Owns the forward hooks, the module stack and the per-site statistics."""

    def __init__(
        self,
        model: nn.Module,
        include: tuple[str, ...],
        exclude: tuple[str, ...],
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        self._names = {id(m): n for n, m in model.named_modules()}
        self._include = include
        self._exclude = exclude
        self._on_error = on_error
        self.armed = False
        self.sites: dict[str, Site] = {}
        self.order: list[str] = []  # first-seen order, stable across steps
        self._stack: list[tuple[str, nn.Module, dict]] = []
        self._mode: Optional[_CaptureMode] = None
        self._depth = 0  # nested calls of the root module
        self._root = model
        # Only the root is hooked for good. The other modules are seen through
        # torch's global module hooks, installed for the duration of a logged
        # forward: idle hooks on every module cost every step (2 x 2,002 of
        # them made the forward of benchmarks/wide_model.py 28 -> 39 ms), and
        # registering 4,000 handles per logged step would cost ~45 ms.
        self._inner: list = []
        self._handles = [
            model.register_forward_pre_hook(self._pre),
            model.register_forward_hook(self._post, always_call=True),
        ]

    # -- hooks (return None: anything else would replace the module's output)
    def _pre(self, module: nn.Module, args) -> None:
        if not self.armed:
            return None
        try:
            if module is self._root:
                if self._mode is not None:
                    self._depth += 1
                elif not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
                    return None  # an evaluation pass: not training statistics
                else:
                    self._mode = _CaptureMode(self)
                    self._mode.__enter__()
                    self._stack.clear()
                    self._depth = 1
                    self._attach_inner()
            if self._mode is not None:
                self._stack.append((self._names.get(id(module), "?"), module, {}))
        except Exception as e:  # never into the training loop
            self._on_error("activation hook", e)
        return None

    def _post(self, module: nn.Module, args, output) -> None:
        if self._mode is None:
            return None
        try:
            if self._stack and self._stack[-1][1] is module:
                self._stack.pop()
            if module is self._root:
                self._depth -= 1
                if self._depth <= 0:
                    self._exit_mode()
        except Exception as e:
            self._on_error("activation hook", e)
        return None

    def _attach_inner(self) -> None:
        self._inner.append(module_hooks.register_module_forward_pre_hook(self._inner_pre))
        try:
            self._inner.append(module_hooks.register_module_forward_hook(self._inner_post, always_call=True))
        except TypeError:  # older torch: the root's own hook still clears the stack on an exception
            self._inner.append(module_hooks.register_module_forward_hook(self._inner_post))

    # Global hooks see every module that runs, this model's or not: only ours count.
    def _inner_pre(self, module: nn.Module, args) -> None:
        if module is not self._root and id(module) in self._names:
            self._pre(module, args)
        return None

    def _inner_post(self, module: nn.Module, args, output) -> None:
        if module is not self._root and id(module) in self._names:
            self._post(module, args, output)
        return None

    def _exit_mode(self) -> None:
        mode, self._mode = self._mode, None
        self._depth = 0
        self._stack.clear()
        inner, self._inner = self._inner, []
        for h in inner:
            h.remove()
        if mode is not None:
            mode.__exit__(None, None, None)

    # -- recording
    def _selected(self, name: str) -> bool:
        if self._include and not any(fnmatch.fnmatchcase(name, p) for p in self._include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self._exclude)

    def record(self, spec: tuple[str, str], out) -> None:
        """Attribute one activation call to the module on top of the stack and add its output."""
        try:
            kind, fname = spec
            if not self._stack:
                return
            mod_name, module, counts = self._stack[-1]
            if isinstance(module, ACTIVATION_MODULES) and not counts:
                name, type_name = mod_name, type(module).__name__
                counts[fname] = 1
                if isinstance(module, nn.ReLU6):  # F.hardtanh(x, 0, 6): dead units make sense
                    kind = "relu"
            else:
                n = counts.get(fname, 0) + 1
                counts[fname] = n
                base = f"{mod_name}.{fname}()" if mod_name else f"{fname}()"
                name = base if n == 1 else f"{base}#{n}"
                type_name = f"F.{fname}"
            if not self._selected(name):
                return
            site = self.sites.get(name)
            if site is None:
                site = self.sites[name] = Site(name, kind, type_name, mod_name)
                self.order.append(name)
            site.add(out)
        except Exception as e:
            self._on_error("activation capture", e)

    def take(self) -> list[Site]:
        """The sites seen since the last take, in stable order."""
        return [self.sites[n] for n in self.order if self.sites[n].seen]

    def clear(self) -> None:
        """Forget every site's statistics (after a step)."""
        for s in self.sites.values():
            s.clear()

    def close(self) -> None:
        """Leave the mode if it is active and remove every hook."""
        self.armed = False
        self._exit_mode()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.sites.clear()
