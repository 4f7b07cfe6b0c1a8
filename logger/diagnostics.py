"""`Diagnostics`: the one object a training loop adds. It orchestrates the collectors (`collectors/`)."""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from tb_diag_logger import cost, distributed, reductions
from tb_diag_logger.activations import ActivationCapture
from tb_diag_logger.arguments import (  # noqa: F401  (re-exported: the integrations import them from here)
    DiagnosticsWarning,
    _patterns,
    check_every,
    check_output,
    check_scaler,
    unwrap_model,
    warn_once,
)
from tb_diag_logger.collectors import Collector, Item, Part, Selection, StepContext
from tb_diag_logger.collectors.amp import AmpState
from tb_diag_logger.collectors.between import BetweenSteps
from tb_diag_logger.collectors.learning_rate import LearningRate
from tb_diag_logger.collectors.logits import LogitCapture
from tb_diag_logger.collectors.losses import Losses, LossLike, check_losses, check_scalar
from tb_diag_logger.collectors.optim_state import AdamState
from tb_diag_logger.collectors.params import ParameterNorms
from tb_diag_logger.collectors.preclip import PreclipNorm
from tb_diag_logger.collectors.sites import ActivationSites
from tb_diag_logger.collectors.updates import UpdateRatio
from tb_diag_logger.collectors.validation import Validation, check_step
from tb_diag_logger.collectors.wiring import STEP_ORDER_ADVICE, WiringChecks, managed_by_engine
from tb_diag_logger.compiled import CompiledCapture
from tb_diag_logger.cost import CostMeter, DiagnosticsCostWarning
from tb_diag_logger.optimizers import unwrap_optimizer
from tb_diag_logger.output import Output
from tb_diag_logger.structure import module_tree
from tb_diag_logger.summaries import SummarySink
from tb_diag_plugin import metadata

DEFAULT_EVERY = 20


class Diagnostics:
    """Records why training goes wrong as TensorBoard summaries.

    Call ``step(step, loss=..., losses=...)`` once per optimizer step, after
    ``backward()`` and before ``optimizer.step()`` / the next ``zero_grad()``.
    Every ``every``-th step (``step % every == 0``) is logged: per-parameter
    gradient and weight norms, activation statistics of the forward passes
    since the previous ``step()`` call, the loss and its components, and the
    update ratio of the optimizer step that follows. Other steps cost
    nothing: the forward hooks return at once and no tensor is touched.

    Between logged steps, every ``step()`` updates a few device-side
    accumulators without a host synchronisation (the loss's maximum and
    minimum, the gradient norm's maximum when it is known, the first
    non-finite step), read with the next logged step. On logged steps the
    loop's wiring is checked: whether the gradients were reset since the
    previous optimizer step (``grad_carried``), modules in the wrong mode,
    optimizer tensors that are not the model's; a ``step()`` called where
    no parameter has a gradient (before ``backward()``) warns once and
    records no gradient metrics for that step (collectors/wiring.py).

    Gradient accumulation: run the forward/backward passes of all
    micro-batches, then call ``step()`` once, before ``optimizer.step()``.
    The gradient metrics are those of the accumulated ``.grad`` (what the
    optimizer uses); the activation statistics cover every micro-batch's
    forward (a unit is dead if no sample of any micro-batch made it
    positive); pass the loss of the whole step (e.g. the sum of the
    micro-batch losses, or a per-sample tensor of all of them)::

        for step in range(steps):
            for x, y in micro_batches:
                loss = F.cross_entropy(model(x), y) / len(micro_batches)
                loss.backward()
                total += loss.detach()
            diag.step(step, loss=total)
            opt.step(); opt.zero_grad()

    AMP: pass ``scaler=`` (a ``torch.amp.GradScaler``) and call ``step()``
    before ``scaler.step(opt)``, with or without ``scaler.unscale_(opt)``
    first: gradients are recorded unscaled either way, ``amp_scale`` is the
    loss scale, and ``amp_skipped`` is 1 on a step the scaler skips because
    of inf/NaN gradients.

    torch.distributed: create ``Diagnostics`` after
    ``init_process_group`` on every rank and call ``step()`` on every rank
    (logged steps run a few small collectives). Only ``write_rank`` writes,
    so a job has one event stream; activation statistics and losses are
    reduced over all ranks' batches; under DDP gradient norms are those of
    the synchronised gradients, under FSDP2 (``fully_shard``) they are
    computed from the shards and reduced, never gathered.

    ``torch.compile``: create ``Diagnostics`` with the compiled model before
    its first forward. Activation modules (``nn.ReLU``, ``nn.GELU``, ...) get
    forward hooks that dynamo compiles into the graph (one extra graph for
    logged steps, no graph breaks); functional activations (``F.gelu``
    inside ``forward``) are not captured in a compiled model.

    Args:
        model: the module being trained (DDP, DataParallel and
            ``torch.compile`` wrappers are unwrapped for names).
        writer: the user's ``SummaryWriter``; diagnostics land in its event file.
        logdir: alternatively, a directory for a writer that ``Diagnostics``
            creates and closes.
        every: log every ``every``-th step.
        optimizer: enables ``update_ratio`` and ``learning_rate``, Adam
            state (``adam_eps_fraction``, ``update_rms``) and the optimizer's
            hyper-parameters in the structure document; a wrapper holding the
            torch optimizer as ``.optimizer`` (accelerate, Lightning, ZeRO) is
            unwrapped.
        scaler: a ``torch.amp.GradScaler``, so that scaled gradients are
            recorded unscaled and skipped steps are recorded as such.
        include, exclude: glob patterns over parameter and activation-site
            names (``"encoder.*"``); ``grad_norm_total`` covers the included
            parameters.
        activations: capture activation statistics (two forward hooks on the
            root module and, during logged forwards only, a TorchFunctionMode)
            and the output logits' growth (one more root hook; see logits.py).
        update_ratio: keep one copy of the parameters to measure the update
            size on logged steps (costs memory equal to the parameters).
            ``‖Δw‖/‖w‖`` is NaN for a tensor whose weights were all zero.
        write_rank: under torch.distributed, the rank that writes (the
            others only take part in the reductions).
        grad_norm_every_step: measure the global gradient norm at every
            step, for ``grad_norm_max_between`` (one pass over the
            gradients per step); without it that metric comes from
            ``step(grad_norm=)`` only, NaN when not passed.
        impl: for tests and benchmarks, how parameter norms are reduced
            (``"flat"``, ``"stream"`` or ``"foreach"``, see
            ``reductions.Plan``); None chooses per parameter layout.

    Each family of metrics is a collector (``collectors/``); ``observers``
    are called with ``(step, items)`` on the writing rank with everything a
    step writes, just before it is written.
    """


    def __init__(
        self,
        model: nn.Module,
        writer: Any = None,
        *,
        logdir: Optional[Union[str, os.PathLike]] = None,
        every: int = DEFAULT_EVERY,
        optimizer: Any = None,
        scaler: Any = None,
        include: Union[str, Sequence[str], None] = None,
        exclude: Union[str, Sequence[str], None] = None,
        activations: bool = True,
        update_ratio: bool = True,
        write_rank: int = 0,
        grad_norm_every_step: bool = False,
        impl: Optional[str] = None,
    ) -> None:
        outer = model
        self.model, compiled = unwrap_model(model)
        self.every = check_every(every)
        check_output(writer, logdir, write_rank)
        check_scaler(scaler)
        reductions.choose([], impl)  # a ValueError naming the choices, not a warning on a logged step
        if not isinstance(grad_norm_every_step, bool):
            raise TypeError(f"grad_norm_every_step must be a bool, got {grad_norm_every_step!r}")
        engine = managed_by_engine(outer, optimizer)  # issue 22: before the wrappers are unwrapped
        optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None  # hooks go on the real one
        selected = Selection(_patterns(include, "include"), _patterns(exclude, "exclude"))
        self._out = Output(writer, logdir, write_rank, self._report, before_exit=self._write_late)
        self._optimizer = optimizer
        self._warned: set[str] = set()
        self._closed = False
        self._last_step: Optional[int] = None
        self._prev_step: Optional[int] = None
        self._structure_sites: Optional[set[str]] = None
        self._cost = CostMeter(self.every)
        self._prev_logged = False
        self._ctx = StepContext()
        self.collectors: list[Collector] = []
        self.observers: list[Callable[[int, list[Item]], None]] = []

        # Integer parameters (possible with requires_grad=False) have no norms to speak of.
        self._params = [(n, p) for n, p in self.model.named_parameters()
                        if selected(n) and (p.is_floating_point() or p.is_complex())]
        self._updates: Optional[UpdateRatio] = None
        if update_ratio and optimizer is not None:
            try:
                self._updates = self._add(UpdateRatio(optimizer, self._params, self._report, impl))
            except Exception as e:  # an optimizer that refuses hooks costs only this diagnostic
                self._report("update_ratio", e)
        amp = self._add(AmpState(scaler, optimizer)) if scaler is not None else None
        self._norms = self._add(ParameterNorms(self._params, impl=impl, amp=amp, updates=self._updates))
        self._capture: Any = None
        self._sites: Optional[ActivationSites] = None
        if activations:
            # A compiled graph cannot hold the eager capture's TorchFunctionMode: traced module hooks instead.
            self._capture = (CompiledCapture if compiled else ActivationCapture)(self.model, selected, self._report)
            self._capture.armed = True  # the first forward may belong to a logged step
            self._sites = self._add(ActivationSites(self._capture))
        self._losses = self._add(Losses())
        if self._capture is not None:  # logits ride on the capture's arming (logged training forwards only)
            capture = self._capture
            # On a compiled model the hook goes on the compiled wrapper, whose hooks run outside the graph.
            hook_on = outer if compiled and isinstance(getattr(outer, "_orig_mod", None), nn.Module) else self.model
            self._add(LogitCapture(self.model, lambda: capture.armed, self._report, hook_on=hook_on))
        if optimizer is not None:
            self._add(AdamState(self._params, optimizer))
        self._preclip = self._add(PreclipNorm())
        if optimizer is not None:
            self._add(LearningRate(optimizer))
        self._validation = self._add(Validation())
        # --- issue 22: the loop's wiring (logged steps only) and what happens between logged steps
        # (every step, no host sync); see collectors/wiring.py and collectors/between.py.
        root = outer if compiled and isinstance(getattr(outer, "_orig_mod", None), nn.Module) else self.model
        self._wiring = self._add(WiringChecks(self.model, self._params, optimizer, self._report, hook_on=root,
                                              engine=engine or managed_by_engine(params=self._params)))
        self._wiring.arm(True)  # the first step may be a logged one
        self._between = self._add(BetweenSteps(self._params, measure_grad_norm=grad_norm_every_step, amp=amp))
        # --- end of issue 22
        if distributed.initialized():
            self._out.ensure()  # else at the first step(): init_process_group may come after us

    def _add(self, collector: Any) -> Any:
        """Register a collector: it reads the orchestrator's step context; the order is the write order."""
        collector.ctx = self._ctx
        self.collectors.append(collector)
        return collector

    @property
    def _sink(self) -> Optional[SummarySink]:
        """The summary sink on the writing rank, None on the others (and before the first step())."""
        return self._out.sink

    # ------------------------------------------------------------------ api
    def __enter__(self) -> Diagnostics:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def should_log(self, step: int) -> bool:
        """Whether `step(step)` records anything."""
        return step % self.every == 0

    def step(
        self,
        step: int,
        loss: Optional[LossLike] = None,
        losses: Optional[Mapping[str, LossLike]] = None,
        grad_norm: Optional[LossLike] = None,
    ) -> None:
        """Record diagnostics for optimizer step `step` if it is a logged step.

        Call it after `backward()` and before `optimizer.step()`. `loss` is
        the total loss (a scalar); `losses` names its components (scalars, or
        1-D per-sample tensors from ``reduction="none"``, whose spread is
        recorded too). Steps must increase. A failure inside a diagnostic is
        reported once as a `DiagnosticsWarning`, never raised.

        `grad_norm` is the global gradient norm before clipping (a float or a
        0-d tensor, e.g. what ``torch.nn.utils.clip_grad_norm_`` returns),
        recorded as ``grad_norm_preclip``; ``grad_norm_total`` is measured
        here, after clipping, so the two show how much clipping changed.
        """
        if self._closed:
            raise RuntimeError("Diagnostics.step() called after close()")
        step = check_step(step)
        if step == self._last_step and self._updates is not None and self._updates.in_closure_step:
            # LBFGS calls the closure again within one optimizer step: the first call is the step's record,
            # the later forwards are not the next step's.
            if self._capture is not None:
                self._capture.clear()
            return
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step must increase: got {step} after {self._last_step}")
        self._losses.items = check_losses(loss, losses)
        self._preclip.value = None if grad_norm is None else check_scalar("grad_norm", grad_norm)

        self._prev_step, self._last_step = self._last_step, step
        logged = self.should_log(step)
        forward_extra = self._cost_at_step(logged)
        self._step_issue22(step)
        try:
            self._out.ensure()
            if logged:
                start = cost.clock()
                with torch.no_grad():  # rather than a .detach() per tensor: one call, not thousands
                    self._log(step)
                self._cost.logged(forward_extra, cost.clock() - start)
            else:
                self._write_late()
        except Exception as e:
            self._report("step", e)
        finally:
            self._prev_logged = logged
            for c in self.collectors:
                c.clear()
            if self._capture is not None:
                self._capture.armed = self._predict_next_logged()
            if self._updates is not None:
                self._updates.pending = step if logged else None
            try:  # issue 22: the wiring hooks watch the next step only if it is likely logged
                self._wiring.arm(self._predict_next_logged())
            except Exception as e:
                self._report("wiring checks", e)

    def _step_issue22(self, step: int) -> None:
        """Issue 22, at every step(): the accumulators (no host sync) and the step-order check (host only).

        A step() called where no parameter has a gradient (before backward()) warns once at the user's
        call, and that step records no gradient metrics (`StepContext.grads_valid`)."""
        try:
            total = next((v for n, v in self._losses.items if n == metadata.TOTAL_LOSS), None)  # `loss=` (check_losses)
            self._between.observe(step, total, self._preclip.value)
            problem = self._wiring.order_problem()
        except Exception as e:
            self._report("wiring checks", e)
            problem = None
        self._ctx.grads_valid = problem is None
        if problem is not None and "step order" not in self._warned:
            self._warned.add("step order")
            warnings.warn(
                f"tb-diag: diag.step({step}) was called where {problem}: {STEP_ORDER_ADVICE}. "
                "The gradient metrics of such steps are not recorded. Reported once.",
                DiagnosticsWarning,
                stacklevel=3,
            )

    def evaluate(
        self,
        step: int,
        loss: Optional[LossLike] = None,
        metrics: Optional[Mapping[str, LossLike]] = None,
    ) -> None:
        """Record a validation result at training step `step` (any step, logged or not).

        `loss` (a scalar tensor or number) is recorded as `val_loss`, layer
        ``total``; `metrics` (name -> scalar, e.g. ``{"accuracy": 0.91}``) as
        `val_metric`, one layer per name. Steps must not decrease between
        `evaluate()` calls (they may lag or lead `step()`). Under
        torch.distributed pass values already reduced over ranks: only
        `write_rank` writes. NaN and inf are recorded as they are. Bad
        arguments raise TypeError/ValueError; a failure while writing is one
        `DiagnosticsWarning`.
        """
        if self._closed:
            raise RuntimeError("Diagnostics.evaluate() called after close()")
        self._validation.record(step, loss, metrics)
        try:
            self._out.ensure()
            self._write_late()
        except Exception as e:
            self._report("evaluate", e)

    def close(self) -> None:
        """Write what is pending, remove every hook, close a writer we created. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._write_late()
        except Exception as e:
            self._report("close", e)
        for c in self.collectors:
            try:
                c.close()
            except Exception as e:
                self._report("close", e)
        self._out.close()

    # ------------------------------------------------------------- logging
    def _log(self, step: int) -> None:
        """One logged step: every collector's parts on the device (every rank), ONE copy to the host split
        by the lengths the parts declared, the collectors' host-side items, one write (one rank)."""
        ctx = self._ctx
        ctx.device = self._norms.device()
        ctx.sharded = distributed.any_sharded(p for _, p in self._params)
        ctx.writes = self._sink is not None
        ctx.reduce = self._ranks_agree()
        late = self._take_late()  # an earlier step's values ride in this step's transfer
        try:
            parts: list[Part] = [p for c in self.collectors for p in c.parts(step)]
        except Exception:
            self._write_late(late)  # not lost with this step's
            raise
        late_parts = [p for _, ps in late for p in ps]
        values = _to_host(late_parts + parts, ctx.device)
        late_values, values = values[:len(late_parts)], values[len(late_parts):]
        host = {p.metric: v for p, v in zip(parts, values)}
        items: list[Item] = [(p.metric, p.names, p.types, v) for p, v in zip(parts, values) if p.write and len(p.names)]
        for c in self.collectors:
            items += c.finish(step, host)
        if self._sink is not None:  # not the writing rank: the collectives above were its share
            self._emit_late(late, late_values)
            self._emit(step, items)
            self._write_structure_if_new(step)

    def _ranks_agree(self) -> bool:
        """Under torch.distributed, whether the ranks reduce this step's values together (they must hold
        the same parameters with gradients, sites and loss names); True without torch.distributed."""
        if not distributed.active():
            return True
        signature = [float(x) for c in self.collectors for x in c.signature()]
        if distributed.agree(signature, self._ctx.device):
            return True
        self._report("torch.distributed", RuntimeError(
            "ranks disagree on parameters with gradients, activation sites or loss names; "
            "recording rank-local values on such steps"))
        return False

    def _emit(self, step: int, items: list[Item]) -> None:
        """The one place a step's items pass before they are written: the observers see them first."""
        for observe in self.observers:
            try:
                observe(step, items)
            except Exception as e:  # an observer's failure costs only itself
                self._report("an observer of the logged values", e)
        self._out.write("write_vectors", step, items)

    def _take_late(self) -> list[tuple[int, list[Part]]]:
        """Every collector's (step, parts) of earlier steps, once."""
        return [entry for c in self.collectors for entry in c.late()]

    def _write_late(self, late: Optional[list[tuple[int, list[Part]]]] = None) -> None:
        """What collectors measured for an earlier step since (the update ratio, an evaluation), in a
        copy of its own: on a step that is not logged, at evaluate() and at close()."""
        late = self._take_late() if late is None else late
        if late and self._sink is not None:
            self._emit_late(late, _to_host([p for _, ps in late for p in ps], self._norms.device()))

    def _emit_late(self, late: list[tuple[int, list[Part]]], values: list[np.ndarray]) -> None:
        """Write each earlier step's parts under its own step, from their host `values` (in order)."""
        at = 0
        for step, parts in late:
            self._emit(step, [(p.metric, p.names, p.types, v) for p, v in zip(parts, values[at:at + len(parts)])])
            at += len(parts)

    def _write_structure_if_new(self, step: int) -> None:
        """The model's structure, again whenever a step shows an activation site it did not list."""
        seen = {s.name for s in self._sites.seen} if self._sites is not None else set()
        if self._structure_sites is not None and seen <= self._structure_sites:
            return
        self._structure_sites = seen | (self._structure_sites or set())
        known = [self._capture.sites[n] for n in self._capture.order] if self._capture is not None else []
        tree = module_tree(self.model, {n for n, _ in self._params}, known, self._optimizer)
        self._out.write("write_structure", step, tree)

    # ------------------------------------------------------------- helpers
    def _cost_at_step(self, logged: bool) -> Optional[float]:
        """Feed the cost meter (see `cost.py`); warn once if logging takes a large share of training time.
        Returns what capture added to this step's forward, for `CostMeter.logged`."""
        try:
            if self._prev_logged:  # the step before was logged: its optimizer hooks have run since
                hooks_s = 0.0
                if self._updates is not None:
                    hooks_s, self._updates.cost_s = self._updates.cost_s, 0.0
                sites = len(self._capture.sites) if self._capture is not None else 0
                message = self._cost.settle(
                    hooks_s, lambda: f"{sites} activation sites, {len(self._params)} parameter tensors"
                )
                if message is not None:
                    warnings.warn(message, DiagnosticsCostWarning, stacklevel=3)
            forward = self._capture.take_forward_time() if self._capture is not None else None
            return self._cost.step_called(cost.clock(), logged, self._prev_logged, forward)
        except Exception as e:  # a meter must not cost the step its diagnostics
            self._report("cost meter", e)
            return None

    def _predict_next_logged(self) -> bool:
        """Arm activation capture when the next step() is likely a logged one."""
        if self._last_step is None:
            return True
        delta = 1 if self._prev_step is None else max(1, self._last_step - self._prev_step)
        return self.should_log(self._last_step + delta)

    def _report(self, where: str, exc: BaseException) -> None:
        warn_once(self._warned, where, exc, stacklevel=3)


def _to_host(parts: Sequence[Part], device: torch.device) -> list[np.ndarray]:
    """Every part's values on the host, in ONE device-to-host copy, split by the lengths they declared."""
    values = [p.values.reshape(-1).to(device=device, dtype=torch.float32) for p in parts]
    if not values:
        return []
    flat = torch.cat(values).cpu().numpy()
    return np.split(flat, np.cumsum([v.numel() for v in values])[:-1].tolist())
