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
from tb_diag_logger.collectors import Collector, Item, Part, Selection, StepContext, zero
from tb_diag_logger.collectors.amp import AmpState
from tb_diag_logger.collectors.between import BetweenSteps
from tb_diag_logger.collectors.inputs import InputScale
from tb_diag_logger.collectors.learning_rate import LearningRate
from tb_diag_logger.collectors.logits import LogitCapture
from tb_diag_logger.collectors.losses import Losses, LossLike, check_losses, check_scalar
from tb_diag_logger.collectors.optim_state import AdamState, optimizer_params
from tb_diag_logger.collectors.params import ParameterNorms
from tb_diag_logger.collectors.preclip import PreclipNorm
from tb_diag_logger.collectors.sites import ActivationSites
from tb_diag_logger.collectors.updates import UpdateRatio
from tb_diag_logger.collectors.validation import Validation, check_step
from tb_diag_logger.collectors.wiring import STEP_ORDER_ADVICE, WiringChecks, managed_by_engine
from tb_diag_logger.compiled import CompiledCapture
from tb_diag_logger.cost import CostMeter, DiagnosticsCostWarning
from tb_diag_logger.live import LiveFindings, check_level, decide_stop, stopped_items
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
        alert: announce each finding, the first time it reaches this
            severity ("error", "warning"; None: never), in one line through
            ``logging.getLogger("tb_diag")``; again only if it gets worse.
            ``findings()`` returns the current findings (the tab's rules on
            the values written so far).
        stop_on: once a finding reaches this severity ("error", "warning";
            None, the default: never), ``should_stop`` becomes True after that
            logged step, on every rank at the same step, and the event file
            records the stop.
        grad_norm_every_step: measure the global gradient norm at every
            step, for ``grad_norm_max_between`` (one pass over the
            gradients per step); without it that metric comes from
            ``step(grad_norm=)`` only, NaN when not passed. None (the
            default): on for recurrent models (an ``nn.RNNBase`` inside),
            whose gradient spikes fall between logged steps and whose
            steps make the extra pass cheap, off otherwise.
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
        alert: Optional[str] = "error",
        stop_on: Optional[str] = None,
        grad_norm_every_step: Optional[bool] = None,
        impl: Optional[str] = None,
    ) -> None:
        # ZeRO (collectors/zero.py): a DeepSpeed engine stands for its module and its optimizer.
        if zero.is_engine(model):
            model, optimizer = model.module, model.optimizer if optimizer is None else optimizer
        self._zero_opt = zero.zero_optimizer(optimizer)
        outer = model
        self.model, compiled = unwrap_model(model)
        self.every = check_every(every)
        check_output(writer, logdir, write_rank)
        check_level(alert, "alert")
        check_level(stop_on, "stop_on")
        check_scaler(scaler)
        reductions.choose([], impl)  # a ValueError naming the choices, not a warning on a logged step
        if grad_norm_every_step is not None and not isinstance(grad_norm_every_step, bool):
            raise TypeError(f"grad_norm_every_step must be a bool or None, got {grad_norm_every_step!r}")
        engine = managed_by_engine(outer, optimizer)  # issue 22: before the wrappers are unwrapped
        optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None  # hooks go on the real one
        selected = Selection(_patterns(include, "include"), _patterns(exclude, "exclude"))
        self._out = Output(writer, logdir, write_rank, self._report, before_exit=self._write_late_at_exit)
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
        # live findings (issue 23): an observer of every written item; evaluated in step() and close()
        self._live = LiveFindings(alert, stop_on, os.fspath(logdir) if logdir is not None else None, self._report)
        self.observers.append(self._live.observe_vectors)

        self._selected = selected
        self._impl = impl
        self._want_updates = bool(update_ratio)
        self._params: list[tuple[str, nn.Parameter]] = []
        self._param_ids: list[int] = []
        self._refresh_params()
        self._zero = zero.any_zero(self._params)  # ZeRO: gradients and weights from the engine's partitions
        self._structure_key: Optional[tuple] = None  # what the last structure document said (_lifecycle_key)
        self._pending_versions: Optional[list[int]] = None  # the weights' versions at the last logged step
        self._updates: Any = None
        self._watch_updates()
        amp = self._add(AmpState(scaler, optimizer)) if scaler is not None else None
        self._norms: Any
        if self._zero:
            self._norms = self._add(zero.ZeroGradients(self._params))
        else:
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
            self._add(InputScale(self.model, lambda: capture.armed, self._report, hook_on=hook_on))
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
        if grad_norm_every_step is None:
            grad_norm_every_step = any(isinstance(m, nn.RNNBase) for m in self.model.modules())
        self._between = self._add(BetweenSteps(self._params, measure_grad_norm=grad_norm_every_step, amp=amp))
        # --- end of issue 22
        if distributed.initialized():
            self._out.ensure()  # else at the first step(): init_process_group may come after us

    def _watch_updates(self) -> None:
        """Measure the update ratio through the current optimizer's step hooks (if asked and there is one)."""
        if self._want_updates and self._optimizer is not None:
            try:
                if self._zero:  # the fp32 master fragments, across every parameter group's step
                    self._updates = self._add(zero.ZeroUpdates(self._optimizer, self._params, self._report))
                else:
                    self._updates = self._add(UpdateRatio(self._optimizer, self._params, self._report, self._impl))
            except Exception as e:  # an optimizer that refuses hooks costs only this diagnostic
                self._report("update_ratio", e)

    def _refresh_params(self) -> None:
        """Follow the model's parameters when they were replaced (``load_state_dict(assign=True)``, modules
        added or swapped): the tensors measured are always the model's own."""
        current = list(self.model.named_parameters())
        ids = [id(p) for _, p in current]
        if ids == self._param_ids:
            return
        self._param_ids = ids
        # Integer parameters (possible with requires_grad=False) have no norms to speak of.
        self._params = [(n, p) for n, p in current if self._selected(n) and (p.is_floating_point() or p.is_complex())]
        for c in self.collectors:
            if isinstance(c, (ParameterNorms, AdamState, zero.ZeroGradients)):
                c.params = list(self._params)
                if isinstance(c, ParameterNorms):
                    c.names = [n for n, _ in self._params]
            elif isinstance(c, zero.ZeroUpdates):
                c.follow(self._params)
            elif isinstance(c, UpdateRatio):
                c._params, c._offered = list(self._params), None

    def set_optimizer(self, optimizer: Any) -> None:
        """Follow `optimizer` from now on, in place of the one given before (or none).

        For an optimizer built later in the run (a second training phase, a
        fine-tuning stage): the update ratio, the learning rate, Adam's state
        and the structure document's ``in_optimizer`` come from it from the
        next logged step. The old optimizer's hooks are removed. Wrappers are
        unwrapped as for ``Diagnostics(optimizer=...)``.
        """
        if self._closed:
            raise RuntimeError("Diagnostics.set_optimizer() called after close()")
        new = None if optimizer is None else unwrap_optimizer(optimizer)
        if new is self._optimizer:
            return
        try:
            self._write_late()  # a measurement the old optimizer finished belongs to its step
        except Exception as e:
            self._report("set_optimizer", e)
        following = (UpdateRatio, zero.ZeroUpdates, AdamState, LearningRate)  # what reads the optimizer
        for c in [c for c in self.collectors if isinstance(c, following)]:
            c.close()
            self.collectors.remove(c)
        self._optimizer, self._updates = new, None
        self._zero_opt = zero.zero_optimizer(optimizer)
        self._pending_versions = None
        self._watch_updates()
        if isinstance(self._norms, ParameterNorms):
            self._norms._updates = self._updates
        self._wiring.set_optimizer(new)
        if new is not None:
            self._add(AdamState(self._params, new))
            self._add(LearningRate(new))

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

    def findings(self) -> list:
        """The run's current findings (`tb_diag_plugin.findings.Finding`, worst first): the tab's rules on
        the values written so far. Empty on a rank that does not write."""
        return self._live.findings()

    @property
    def should_stop(self) -> bool:
        """True once a finding reached `stop_on` at a logged step (the same step on every rank)."""
        return self._live.should_stop

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
            self._check_optimizer_stepped()
            if logged:
                start = cost.clock()
                try:
                    with torch.no_grad():  # rather than a .detach() per tensor: one call, not thousands
                        self._log(step)
                finally:  # every rank reaches the stop's collective, even where this step's values failed
                    self._live_step(step)
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
                self._pending_versions = [p._version for _, p in self._params] if logged else None
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
        self._live.evaluate(None)  # live findings (issue 23): what close() wrote, alerted too
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
        self._refresh_params()
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

    def _live_step(self, step: int) -> None:
        """live findings (issue 23): evaluate, then decide on every rank together whether to stop here."""
        live = self._live
        if live.where is None and self._sink is not None:
            live.where = _logdir_of(self._sink.writer)
        live.evaluate(step)
        if live.stop_on is None or live.should_stop:
            return
        if decide_stop(live, self._norms.device()):
            live.should_stop = True
            if self._sink is not None:
                self._emit(step, stopped_items(live.stop_on))

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

    def _write_late_at_exit(self) -> None:
        """`_write_late` when the program ends before close(); not under ZeRO with several ranks, where taking
        the update ratio is a collective that the other ranks, exiting too, would never join."""
        if not (self._zero and distributed.active()):
            self._write_late()

    def _check_optimizer_stepped(self) -> None:
        """The weights moved since the last logged step but the optimizer we hold never stepped: another
        optimizer is training the model (built later without `set_optimizer`). Say so once."""
        versions, self._pending_versions = self._pending_versions, None
        if self._updates is None or self._updates.pending is None or versions is None:
            return
        if versions != [p._version for _, p in self._params]:
            self._report("update_ratio", RuntimeError(
                f"the weights changed but the {type(self._optimizer).__name__} given to Diagnostics did not "
                "step: if you built a new optimizer, call diag.set_optimizer(new_optimizer) so that the "
                "update ratio and learning rate follow it"))

    def _held(self) -> Optional[set[int]]:
        """ids of the model's parameters the optimizer steps (under ZeRO: those in its partitioned groups)."""
        if self._zero and self._zero_opt is not None:
            groups = getattr(self._zero_opt, "fp16_groups", None) or getattr(self._zero_opt, "bit16_groups", None)
            if groups is not None:
                return {id(p) for g in groups for p in g}
        return optimizer_params(self._optimizer)

    def _lifecycle_key(self) -> tuple:
        """What the structure document says that changes during a run: which parameters there are, which
        require gradients and which the optimizer holds, and its parameter groups."""
        held = self._held()
        groups = None if self._optimizer is None else len(self._optimizer.param_groups)
        params = tuple((n, bool(p.requires_grad), None if held is None else id(p) in held)
                       for n, p in self.model.named_parameters())
        return id(self._optimizer), groups, params

    def _write_structure_if_new(self, step: int) -> None:
        """The model's structure, again whenever a step shows an activation site it did not list, or a
        parameter was frozen, unfrozen, added to or left out of the optimizer since the last document."""
        seen = {s.name for s in self._sites.seen} if self._sites is not None else set()
        key = self._lifecycle_key()
        if self._structure_sites is not None and seen <= self._structure_sites and key == self._structure_key:
            return
        self._structure_key = key
        self._structure_sites = seen | (self._structure_sites or set())
        known = [self._capture.sites[n] for n in self._capture.order] if self._capture is not None else []
        tree = module_tree(self.model, {n for n, _ in self._params}, known, self._optimizer, self._held())
        self._out.write("write_structure", step, tree)
        self._live.observe_structure(step, tree)  # live findings (issue 23)

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


def _logdir_of(writer: Any) -> Optional[str]:
    get = getattr(writer, "get_logdir", None)
    try:
        return str(get()) if callable(get) else None
    except Exception:
        return None
