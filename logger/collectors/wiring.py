"""The training loop's own wiring, seen on logged steps only (issue 22).

- `grad_carried`: were the gradients reset between the previous optimizer
  step and the logged step's backward? A tensor hook on one small parameter
  runs before the incoming gradient is added to `.grad`, so it sees exactly
  what the backward accumulates into: nothing or zeros (reset, 0), or the
  gradient as it was right after the previous optimizer step (carried, 1);
  anything else is unknown (NaN). The reference is copied by the optimizer's
  step post-hook (without `optimizer=`, at the previous `step()` call). The
  hook exists only from the `step()` before a logged step to the logged
  step; gradient accumulation (several backwards, no optimizer step between)
  is not this: only the first backward after an optimizer step is looked at.
- The step order: `diag.step()` called where no parameter that requires
  grad has a gradient (before `backward()`: `zero_grad()` sets them to None
  by default, and before the first backward there are none) is found on the
  host, at every call, with one attribute read in the usual case
  (`order_problem`). A call before `backward()` in a loop that never resets
  the gradients to None cannot be told from a call after
  `optimizer.step()` by what the logger sees; it is not reported.
- `eval_in_train` / `train_in_eval`: the mode of mode-sensitive modules
  (BatchNorm, Dropout with p > 0, InstanceNorm with running statistics, a
  multi-layer RNN's dropout) when the root module's forward starts: in eval
  mode during the logged step's grad-enabled forward, or in training mode
  during a forward under `torch.no_grad()`/`inference_mode` since the
  previous logged step. One forward pre-hook on the root reads the flags; a
  module that the forward skips is counted as if it ran.
- `optimizer_orphans`: tensors the optimizer holds that are not parameters
  of the model (a module replaced after the optimizer was built).
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from tb_diag_logger import hooks
from tb_diag_logger.arguments import DiagnosticsWarning
from tb_diag_logger.collectors import Collector, Item, Part
from tb_diag_logger.collectors.optim_state import optimizer_params
from tb_diag_plugin import metadata

GRAD_CARRIED = metadata.METRICS["grad_carried"].name
EVAL_IN_TRAIN = metadata.METRICS["eval_in_train"].name
TRAIN_IN_EVAL = metadata.METRICS["train_in_eval"].name
OPTIMIZER_ORPHANS = metadata.METRICS["optimizer_orphans"].name

STEP_ORDER_ADVICE = "call diag.step() after loss.backward() and before optimizer.step()"


def is_mode_sensitive(module: nn.Module) -> bool:
    """Whether `module` computes something different in training and in eval mode."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return bool(module.track_running_stats)  # without running statistics both modes use the batch's
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return float(module.p) > 0
    if isinstance(module, nn.RNNBase):
        return float(module.dropout) > 0 and module.num_layers > 1
    if isinstance(module, nn.MultiheadAttention):
        return float(module.dropout) > 0
    return False


def managed_by_engine(*objects: Any, params: Sequence[tuple[str, torch.Tensor]] = ()) -> bool:
    """Whether a DeepSpeed engine owns the gradients and the optimizer's tensors (ZeRO: gradients are not
    in `.grad`, the torch optimizer holds flat partitions): the step order and the orphans say nothing there."""
    for obj in objects:
        for _ in range(16):  # wrappers nest a few deep: `.module` of a model, `.optimizer` of an optimizer
            if obj is None:
                break
            if type(obj).__module__.split(".")[0] == "deepspeed":
                return True
            try:
                obj = getattr(obj, "module" if isinstance(obj, nn.Module) else "optimizer", None)
            except Exception:  # a property of a half-built wrapper may raise anything
                break
    return any(hasattr(p, "ds_id") for _, p in params)  # ZeRO-3's partitioned parameters


def carried_value(grad: Optional[torch.Tensor], ref: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """1-element float tensor on `device`: 0 when `grad` (what a backward is about to add to) is None or
    zero, 1 when it equals `ref` (the gradient right after the previous optimizer step), NaN when neither
    is known. Made where it is used: a host-to-device copy would wait for the GPU."""
    if grad is None:
        return torch.zeros(1, device=device)
    g = grad.detach()
    zero = (g == 0).all()
    if ref is None or ref.shape != g.shape or ref.device != g.device:
        return torch.where(zero, 0.0, float("nan")).reshape(1).float()
    ref_zero = (ref == 0).all()
    same = (g == ref).all()
    # Both zero: reset or a zero gradient carried over; not known.
    value = torch.where(zero, torch.where(ref_zero, float("nan"), 0.0), torch.where(same, 1.0, float("nan")))
    return value.reshape(1).float()


class WiringChecks(Collector):
    """`grad_carried`, the step order, the mode of mode-sensitive modules and the optimizer's orphans."""

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[tuple[str, torch.Tensor]],
        optimizer: Optional[torch.optim.Optimizer],
        on_error: Callable[[str, BaseException], None],
        hook_on: Optional[nn.Module] = None,
        engine: bool = False,
    ) -> None:
        """`params` are the (name, parameter) pairs diagnostics cover; `hook_on` (default `model`) is where
        the root's forward pre-hook goes (a compiled wrapper, whose hooks run outside the graph); `engine`:
        an engine owns the gradients and the optimizer's tensors (`managed_by_engine`)."""
        self._model = model
        self._params = list(params)
        self._engine = engine
        self._optimizer = None if engine else optimizer
        self._on_error = on_error
        self.armed = False
        held = optimizer_params(optimizer)
        self._probe: Optional[torch.Tensor] = self._pick_probe(
            [p for _, p in self._params if held is None or id(p) in held]
        )
        self._grad_handle: Any = None  # the probe's tensor hook, only while armed
        self._ref: Optional[torch.Tensor] = None  # the probe's gradient after the previous optimizer step
        self._fired = False  # a backward has reached the probe since the reference was taken
        self._value: Optional[torch.Tensor] = None  # what the latest such backward saw
        self._order_wrong = False  # this step() came before its backward (`order_problem`)
        self._order_warned = False  # the step order's warning is given once
        self._handles: list[Any] = []
        self._opt_handle: Any = None
        if optimizer is not None:
            self._opt_handle = optimizer.register_step_post_hook(self._after_optimizer_step)
        # Mode-sensitive modules, their names, and which were seen in the wrong mode.
        self._modes = [(n, m) for n, m in model.named_modules() if is_mode_sensitive(m)]
        self._eval_seen: set[int] = set()
        self._train_seen: set[int] = set()
        self._trained = False  # a grad-enabled forward of the logged step ran
        if self._modes:
            self._handles.append(hooks.forward_pre_hook(model if hook_on is None else hook_on, self._pre))

    # -- arming (from Diagnostics.step(): the next step is likely a logged one)
    def arm(self, on: bool) -> None:
        """Watch (or stop watching) the backward and the forwards of the next step."""
        try:
            self._arm(on)
        except Exception as e:
            self._on_error("wiring checks", e)

    def _arm(self, on: bool) -> None:
        self.armed = on
        self._fired, self._value = False, None
        self._eval_seen.clear()
        self._trained = False
        if not on or self._probe is None:
            self._remove_grad_hook()
            self._ref = None
            return
        try:
            self._ref = self._snapshot()
            if self._grad_handle is None:
                self._grad_handle = self._probe.register_hook(self._on_grad)
        except Exception as e:
            self._on_error("grad_carried", e)

    def _snapshot(self) -> Optional[torch.Tensor]:
        grad = self._probe.grad if self._probe is not None else None
        return None if grad is None else grad.detach().clone()

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self.armed:
            return None
        try:
            with torch.no_grad():
                self._ref = self._snapshot()
            # The next backward is looked at; what an earlier one saw stays until then (a `step()`
            # called after `optimizer.step()` still gets its own step's observation).
            self._fired = False
        except Exception as e:
            self._on_error("grad_carried", e)
        return None

    def _on_grad(self, grad: torch.Tensor) -> None:
        """Before this backward adds `grad` to the probe's `.grad`: was that reset since the optimizer step?"""
        if not self.armed or self._fired:
            return None  # only the first backward after the optimizer step (gradient accumulation)
        self._fired = True
        try:
            with torch.no_grad():
                self._value = carried_value(self._probe.grad, self._ref, grad.device)
        except Exception as e:
            self._on_error("grad_carried", e)
        return None  # anything else would replace the gradient

    def _pre(self, module: nn.Module, args: Any) -> None:
        try:
            if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
                if self.armed:  # the logged step's training forward
                    self._trained = True
                    self._eval_seen.update(i for i, (_, m) in enumerate(self._modes) if not m.training)
            else:  # what evaluation looks like
                self._train_seen.update(i for i, (_, m) in enumerate(self._modes) if m.training)
        except Exception as e:  # never into the training loop
            self._on_error("module modes", e)
        return None

    # -- every step
    def on_step(self, step: int) -> None:
        """The step order, at every `step()`: one called where no parameter has a gradient (before
        backward()) warns once at the user's call, and records no gradient metrics (`ctx.grads_valid`)."""
        try:
            problem = self.order_problem()
        except Exception as e:
            self._on_error("wiring checks", e)
            problem = None
        self.ctx.grads_valid = problem is None
        if problem is not None and not self._order_warned:
            self._order_warned = True
            warnings.warn(
                f"tb-diag: diag.step({step}) was called where {problem}: {STEP_ORDER_ADVICE}. "
                "The gradient metrics of such steps are not recorded. Reported once.",
                DiagnosticsWarning,
                stacklevel=4,  # the user's diag.step() call (through Diagnostics.step and its _each)
            )

    # -- the logged step
    def order_problem(self) -> Optional[str]:
        """Why the gradients at this `step()` cannot be this step's, or None (host-side, no sync): no
        parameter that requires grad has one. Stops at the first gradient found (the usual case)."""
        self._order_wrong = False
        if self._engine:
            return None
        trainable = False
        for _, p in self._params:
            if p.grad is not None:
                return None
            trainable = trainable or p.requires_grad
        self._order_wrong = trainable  # this step's backward has not run: grad_carried is not known
        return "no parameter has a gradient (.grad is None)" if trainable else None

    def parts(self, step: int) -> list[Part]:
        """`grad_carried` (NaN when no backward was seen after an optimizer step: unknown)."""
        if self._probe is None:
            return []
        if self._probe.grad is None:
            self._repick()  # the probe got no gradient this step (a frozen or unused tensor)
        known = self._value is not None and not self._order_wrong
        value = self._value if known else torch.full((1,), float("nan"), device=self._probe.device)
        return [Part(GRAD_CARRIED, [""], value)]

    def finish(self, step: int, host: dict[str, np.ndarray]) -> list[Item]:
        """The host-side metrics: module modes and the optimizer's orphans."""
        items: list[Item] = []
        if self._modes:
            names = [n for n, _ in self._modes]
            if self._trained:
                items.append((EVAL_IN_TRAIN, names, (), _flags(len(names), self._eval_seen)))
            items.append((TRAIN_IN_EVAL, names, (), _flags(len(names), self._train_seen)))
            self._train_seen.clear()
        if self._optimizer is not None:
            # C-level passes: at thousands of tensors a Python loop over them is the logged step's cost.
            model_params = set(map(id, itertools.chain.from_iterable(
                m._parameters.values() for m in self._model.modules())))
            held = map(id, itertools.chain.from_iterable(g["params"] for g in self._optimizer.param_groups))
            orphans = sum(len(g["params"]) for g in self._optimizer.param_groups) - sum(
                map(model_params.__contains__, held), 0)
            items.append((OPTIMIZER_ORPHANS, [""], (), np.array([orphans], dtype=np.float32)))
        return items

    def _repick(self) -> None:
        with_grad = [p for _, p in self._params if p.grad is not None]
        probe = self._pick_probe(with_grad)
        if probe is not None and probe is not self._probe:
            self._remove_grad_hook()
            self._probe = probe

    @staticmethod
    def _pick_probe(params: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """The smallest dense floating parameter that requires grad (its reference copy costs least)."""
        ok = [
            p for p in params
            if p.requires_grad and p.is_floating_point() and p.layout == torch.strided and p.numel()
            and type(p).__name__ != "DTensor"
        ]
        return min(ok, key=lambda p: p.numel()) if ok else None

    def set_optimizer(self, optimizer: Optional[torch.optim.Optimizer], updates: Any = None) -> None:
        """Follow another optimizer (`Diagnostics.set_optimizer`): its step hook replaces the old one's."""
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None
        self._optimizer = None if self._engine else optimizer
        self._ref = None  # the next optimizer step gives the reference again
        if optimizer is not None:
            self._opt_handle = optimizer.register_step_post_hook(self._after_optimizer_step)

    def _remove_grad_hook(self) -> None:
        if self._grad_handle is not None:
            self._grad_handle.remove()
            self._grad_handle = None

    def close(self) -> None:
        """Remove the tensor hook, the optimizer hook and the root's pre-hook."""
        self.armed = False
        self._remove_grad_hook()
        self.set_optimizer(None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._ref = self._value = None


def _flags(n: int, seen: set[int]) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    out[sorted(seen)] = 1.0
    return out
