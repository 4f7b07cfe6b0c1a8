"""`Diagnostics`: the one object a training loop adds. It orchestrates the collectors (`collectors/`):
argument checks, arming, one concatenation of their parts, one device-to-host copy split by the lengths
they declared, one write. Which collectors (`collectors/build.py`), what changes during a run
(`lifecycle.py`), findings in the process (`live.py`), the cost meter (`cost.py`) and where values are
written (`output.py`) live in their own modules."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from tb_diag_logger import cost, distributed
from tb_diag_logger.arguments import (  # noqa: F401  (re-exported: the integrations import them from here)
    DiagnosticsWarning,
    _patterns,
    check_every,
    check_impl,
    check_optional_bool,
    check_output,
    check_scaler,
    unwrap_model,
    warn_once,
)
from tb_diag_logger.collectors import Collector, Item, Part, Selection, StepContext, build, to_host, zero
from tb_diag_logger.collectors.losses import LossLike, check_losses, check_scalar
from tb_diag_logger.collectors.validation import check_step
from tb_diag_logger.collectors.wiring import managed_by_engine
from tb_diag_logger.cost import CostMeter, DiagnosticsCostWarning  # noqa: F401  (re-exported)
from tb_diag_logger.lifecycle import Lifecycle
from tb_diag_logger.live import LiveFindings, check_level
from tb_diag_logger.optimizers import unwrap_optimizer
from tb_diag_logger.output import Output
from tb_diag_logger.summaries import SummarySink

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

    Each family of metrics is a collector (``collectors/``, chosen in
    ``collectors/build.py``); ``observers`` are called with ``(step, items)``
    on the writing rank with everything a step writes, just before it is
    written.
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
        if zero.is_engine(model):  # a DeepSpeed engine stands for its module and its optimizer
            model, optimizer = model.module, model.optimizer if optimizer is None else optimizer
        outer = model
        self.model, compiled = unwrap_model(model)
        self.every = check_every(every)
        check_output(writer, logdir, write_rank)
        check_level(alert, "alert")
        check_level(stop_on, "stop_on")
        check_scaler(scaler)
        self._impl = check_impl(impl)
        grad_norm_every_step = check_optional_bool(grad_norm_every_step, "grad_norm_every_step")
        selected = Selection(_patterns(include, "include"), _patterns(exclude, "exclude"))
        engine = managed_by_engine(outer, optimizer)  # before the wrappers are unwrapped
        self._out = Output(writer, logdir, write_rank, self._report, before_exit=self._write_late_at_exit)
        self._warned: set[str] = set()
        self._closed = False
        self._last_step: Optional[int] = None
        self._prev_step: Optional[int] = None
        self._cost = CostMeter(self.every)
        self._ctx = StepContext()
        self._want_updates = bool(update_ratio)
        # live findings: an observer of every written item; evaluated in step() and close()
        self._live = LiveFindings(alert, stop_on, os.fspath(logdir) if logdir is not None else None, self._report)
        self.observers.append(self._live.observe_vectors)
        zero_opt = zero.zero_optimizer(optimizer)
        optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None  # hooks go on the real one
        self._life = Lifecycle(self.model, selected, optimizer, zero_opt, self._report)
        built = build.build(outer, self.model, compiled, self._life.params, optimizer, scaler=scaler,
                            selected=selected, activations=activations, update_ratio=self._want_updates,
                            grad_norm_every_step=grad_norm_every_step, impl=impl, engine=engine,
                            report=self._report, ctx=self._ctx)
        self._norms, self._capture, self._sites = built.norms, built.capture, built.sites
        self._updates, self._validation = built.updates, built.validation
        self.collectors: list[Collector] = built.collectors  # the order of writing
        self._each("arm", "arming", True)  # the first step may be a logged one
        if distributed.initialized():
            self._out.ensure()  # else at the first step(): init_process_group may come after us

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
        if new is self._life.optimizer:
            return
        try:
            self._write_late()  # a measurement the old optimizer finished belongs to its step
        except Exception as e:
            self._report("set_optimizer", e)
        life = self._life
        fresh = functools.partial(build.optimizer_collectors, params=life.params, update_ratio=self._want_updates,
                                  sharded=life.zero, impl=self._impl, report=self._report, ctx=self._ctx)
        self._updates = life.set_optimizer(self.collectors, new, zero.zero_optimizer(optimizer), fresh)

    @property
    def observers(self) -> list[Callable[[int, list[Item]], None]]:
        """Called with ``(step, items)`` on the writing rank with everything a step writes, before it is written."""
        return self._out.observers

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
        self._ctx.losses = check_losses(loss, losses)
        self._ctx.grad_norm = None if grad_norm is None else check_scalar("grad_norm", grad_norm)

        self._prev_step, self._last_step = self._last_step, step
        logged = self.should_log(step)
        forward_extra = self._cost.at_step(logged, self._capture, self._updates, len(self._life.params),
                                           self._report)
        self._each("on_step", "step", step)  # the accumulators between logged steps, the step order
        try:
            self._out.ensure()
            self._life.check_optimizer_stepped(self._updates)
            if logged:
                start = cost.clock()
                try:
                    with torch.no_grad():  # rather than a .detach() per tensor: one call, not thousands
                        self._log(step)
                finally:  # every rank reaches the stop's collective, even where this step's values failed
                    writer = self._sink.writer if self._sink is not None else None
                    self._live.at_logged_step(step, writer, self._norms.device(), self._out.emit)
                self._cost.logged(forward_extra, cost.clock() - start)
            else:
                self._write_late()
        except Exception as e:
            self._report("step", e)
        finally:
            self._ctx.losses, self._ctx.grad_norm = [], None  # nothing of a step outlives it
            self._each("clear", "step")
            self._life.after_step(self._updates, step, logged)
            self._each("arm", "arming", self._predict_next_logged())

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
        if self._live.listening:
            self._live.evaluate(None)  # live findings: what close() wrote, alerted too
        self._each("close", "close")
        self._out.close()

    # ------------------------------------------------------------- logging
    def _log(self, step: int) -> None:
        """One logged step: every collector's parts on the device (every rank), ONE copy to the host split
        by the lengths the parts declared, the collectors' host-side items, one write (one rank)."""
        self._life.refresh(self.collectors)
        ctx = self._ctx
        ctx.device = self._norms.device()
        ctx.sharded = self._life.sharded  # found when the parameters change
        ctx.writes = self._sink is not None
        ctx.reduce = self._ranks_agree()
        late = [entry for c in self.collectors for entry in c.late()]  # they ride in this step's copy
        try:
            parts: list[Part] = [p for c in self.collectors for p in c.parts(step)]
        except Exception:
            self._write_late(late)  # not lost with this step's
            raise
        late_parts = [p for _, ps in late for p in ps]
        values = to_host(late_parts + parts, ctx.device)
        late_values, values = values[:len(late_parts)], values[len(late_parts):]
        host = {p.metric: v for p, v in zip(parts, values)}
        items: list[Item] = [(p.metric, p.names, p.types, v) for p, v in zip(parts, values) if p.write and len(p.names)]
        for c in self.collectors:
            items += c.finish(step, host)
        if self._sink is not None:  # not the writing rank: the collectives above were its share
            self._out.write_late(late, ctx.device, late_values)
            self._out.emit(step, items)
            tree = self._life.structure_if_new(self._sites, self._capture)
            if tree is not None:
                self._out.write("write_structure", step, tree)
                self._live.observe_structure(step, tree)

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

    def _write_late(self, late: Optional[list[tuple[int, list[Part]]]] = None) -> None:
        """What collectors measured for an earlier step since (the update ratio, an evaluation), in a
        copy of its own: on a step that is not logged, at evaluate() and at close()."""
        late = [entry for c in self.collectors for entry in c.late()] if late is None else late
        if late:
            self._out.write_late(late, self._norms.device())

    def _write_late_at_exit(self) -> None:
        """`_write_late` when the program ends before close(); not under ZeRO with several ranks, where taking
        the update ratio is a collective that the other ranks, exiting too, would never join."""
        if not (self._life.zero and distributed.active()):
            self._write_late()

    def _each(self, method: str, where: str, *args: Any) -> None:
        """`method(*args)` on every collector, in order; one's failure costs only itself (one warning)."""
        for c in self.collectors:
            try:
                getattr(c, method)(*args)
            except Exception as e:
                self._report(where, e)

    def _predict_next_logged(self) -> bool:
        """Whether the next step() is likely a logged one (from the steps' spacing so far)."""
        if self._last_step is None:
            return True
        delta = 1 if self._prev_step is None else max(1, self._last_step - self._prev_step)
        return self.should_log(self._last_step + delta)

    def _report(self, where: str, exc: BaseException) -> None:
        warn_once(self._warned, where, exc, stacklevel=3)

