"""`Diagnostics`: the one object a training loop adds."""

from __future__ import annotations

import atexit
import fnmatch
import functools
import math
import numbers
import os
import warnings
import weakref
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from tb_diag_logger import amp, cost, distributed, evaluation, optim_state, reductions
from tb_diag_logger.activations import ActivationCapture
from tb_diag_logger.compiled import CompiledCapture
from tb_diag_logger.cost import CostMeter, DiagnosticsCostWarning
from tb_diag_logger.live import LiveFindings, LiveSink, check_level, decide_stop, stopped_items
from tb_diag_logger.logits import LogitCapture
from tb_diag_logger.losses import SPREAD_METRICS, LossLike, check_losses, check_scalar, is_per_sample, loss_tensors
from tb_diag_logger.optimizers import unwrap_optimizer
from tb_diag_logger.structure import module_tree
from tb_diag_logger.summaries import SummarySink
from tb_diag_logger.updates import UpdateRatio
from tb_diag_plugin import metadata

DEFAULT_EVERY = 20


class DiagnosticsWarning(UserWarning):
    """A diagnostic failed; training goes on (reported once per place)."""


def warn_once(warned: set[str], where: str, exc: BaseException, stacklevel: int = 2) -> None:
    """One `DiagnosticsWarning` per place and exception type (`warned` remembers them): training goes on.

    `stacklevel` as `warnings.warn` would count it from the caller."""
    key = f"{where}:{type(exc).__name__}"
    if key in warned:
        return
    warned.add(key)
    warnings.warn(
        f"tb-diag: {where} failed ({type(exc).__name__}: {exc}); training continues, "
        "this diagnostic may be missing. Reported once.",
        DiagnosticsWarning,
        stacklevel=stacklevel + 1,
    )


def _patterns(value: Union[str, Sequence[str], None], name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name} must be a glob pattern or a list of them, got {value!r}")
    return tuple(value)


def _unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose names users know: inside DDP/DataParallel and torch.compile.

    Returns (module, compiled).
    """
    compiled = False
    for _ in range(8):
        if getattr(model, "_compiled_call_impl", None) is not None:  # nn.Module.compile(), in place
            compiled = True
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile(model)
            model, compiled = model._orig_mod, True
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        else:
            break
    return model, compiled


def check_every(every: Any) -> int:
    """`every` as a positive int; TypeError/ValueError naming it otherwise (Diagnostics and the callbacks)."""
    if isinstance(every, bool) or not isinstance(every, numbers.Integral):
        raise TypeError(f"every must be a positive int, got {every!r}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return int(every)


def _name_hash(names: Sequence[str]) -> float:
    return float(zlib.crc32("\n".join(names).encode("utf-8")))


class Diagnostics:
    """Records why training goes wrong as TensorBoard summaries.

    Call ``step(step, loss=..., losses=...)`` once per optimizer step, after
    ``backward()`` and before ``optimizer.step()`` / the next ``zero_grad()``.
    Every ``every``-th step (``step % every == 0``) is logged: per-parameter
    gradient and weight norms, activation statistics of the forward passes
    since the previous ``step()`` call, the loss and its components, and the
    update ratio of the optimizer step that follows. Other steps cost
    nothing: the forward hooks return at once and no tensor is touched.

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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_every(every)
        if isinstance(writer, (str, os.PathLike)):
            raise TypeError(
                f"writer must be a torch.utils.tensorboard.SummaryWriter, got the path {os.fspath(writer)!r}: "
                "pass a directory as logdir= instead"
            )
        if writer is not None and not callable(getattr(writer, "_get_file_writer", None)):
            raise TypeError(
                f"writer must be a torch.utils.tensorboard.SummaryWriter, got {type(writer).__name__}"
            )
        if writer is not None and logdir is not None:
            raise ValueError("pass either writer or logdir, not both")
        if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(f"logdir must be a path, got {type(logdir).__name__}")
        if optimizer is not None:
            optimizer = unwrap_optimizer(optimizer)  # accelerate/Lightning/ZeRO wrappers: hooks go on the real one
        if scaler is not None and not amp.is_scaler(scaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if isinstance(write_rank, bool) or not isinstance(write_rank, numbers.Integral) or write_rank < 0:
            raise ValueError(f"write_rank must be a rank (an int >= 0), got {write_rank!r}")
        include_p = _patterns(include, "include")
        exclude_p = _patterns(exclude, "exclude")
        check_level(alert, "alert")
        check_level(stop_on, "stop_on")

        if writer is None and logdir is None and not (distributed.initialized() and distributed.rank() != write_rank):
            raise ValueError("pass a SummaryWriter as writer, or a directory as logdir")
        if distributed.initialized() and write_rank >= distributed.world_size():
            raise ValueError(
                f"write_rank must be a rank below the world size {distributed.world_size()}, got {write_rank}"
            )

        self.every = int(every)
        self._write_rank = int(write_rank)
        self._writer_arg = writer
        self._logdir = os.fspath(logdir) if logdir is not None else None
        self._sink: Optional[SummarySink] = None
        self._sink_ready = False
        self._own_writer = False
        self._exit_hook: Optional[Callable[[], None]] = None

        self.model, compiled = _unwrap(model)
        self._include = include_p
        self._exclude = exclude_p
        self._optimizer = optimizer
        self._scaler = scaler
        self._warned: set[str] = set()
        self._closed = False
        self._last_step: Optional[int] = None
        self._prev_step: Optional[int] = None
        self._last_eval_step: Optional[int] = None  # evaluate() has its own order
        self._structure_sites: Optional[tuple[str, ...]] = None
        self._cost = CostMeter(self.every)
        self._prev_logged = False
        self._grad_norm_preclip: Optional[LossLike] = None  # step(grad_norm=), for _log_values
        # live findings (issue 23): sees what the sink writes (see _ensure_sink), evaluated in _log and close
        self._live = LiveFindings(alert, stop_on, self._logdir, self._report)

        # Integer parameters (possible with requires_grad=False) have no norms to speak of.
        self._params = [
            (n, p)
            for n, p in self.model.named_parameters()
            if self._selected(n) and (p.is_floating_point() or p.is_complex())
        ]
        self._capture: Optional[ActivationCapture] = None
        if activations:
            # A compiled graph cannot hold the eager capture's TorchFunctionMode: traced module hooks instead.
            kind = CompiledCapture if compiled else ActivationCapture
            self._capture = kind(self.model, self._include, self._exclude, self._report)
            self._capture.armed = True  # the first forward may belong to a logged step
        # Output logits ride on the activation capture's arming (logged training forwards only).
        capture = self._capture
        # On a compiled model the hook goes on the compiled wrapper, whose hooks run outside the graph.
        outer = model if compiled and isinstance(getattr(model, "_orig_mod", None), nn.Module) else self.model
        self._logits = None
        if capture is not None:
            self._logits = LogitCapture(self.model, lambda: capture.armed, self._report, hook_on=outer)

        self._updates: Optional[UpdateRatio] = None
        if update_ratio and optimizer is not None:
            try:
                self._updates = UpdateRatio(optimizer, self._params, self._report)
            except Exception as e:  # an optimizer that refuses hooks costs only this diagnostic
                self._report("update_ratio", e)

        if distributed.initialized():
            self._ensure_sink()
        # else: decided at the first step(), so that a Diagnostics created before
        # init_process_group still lets only `write_rank` write (and create files).

    def _ensure_sink(self) -> None:
        """Decide once whether this process writes; create our own writer only on the writing rank."""
        if self._sink_ready:
            return
        self._sink_ready = True
        writer, self._writer_arg = self._writer_arg, None
        if distributed.rank() != self._write_rank:
            if not distributed.initialized():
                self._report(
                    "write_rank",
                    ValueError(
                        f"write_rank={self._write_rank} but torch.distributed is not initialized: nothing is written"
                    ),
                )
            return
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(self._logdir)
            self._own_writer = True
        self._sink = LiveSink(SummarySink(writer), self._live)  # live findings (issue 23)
        self._live.where = self._live.where or _logdir_of(writer)
        # Events still queued in the writer when the program ends (an uncaught
        # KeyboardInterrupt) before close() are flushed at exit.
        self._exit_hook = functools.partial(_flush_at_exit, weakref.ref(self))
        atexit.register(self._exit_hook)

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
        step = evaluation.check_step(step)
        if step == self._last_step and self._updates is not None and self._updates.in_closure_step:
            # LBFGS calls the closure again within one optimizer step: the first call is the step's record,
            # the later forwards are not the next step's.
            if self._capture is not None:
                self._capture.clear()
            return
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step must increase: got {step} after {self._last_step}")
        loss_items = check_losses(loss, losses)
        self._grad_norm_preclip = None if grad_norm is None else check_scalar("grad_norm", grad_norm)

        self._prev_step, self._last_step = self._last_step, step
        logged = self.should_log(step)
        forward_extra = self._cost_at_step(logged)
        try:
            self._write(self._ensure_sink)
            self._flush_update_ratio()
            if logged:
                start = cost.clock()
                self._log(step, loss_items)
                self._cost.logged(forward_extra, cost.clock() - start)
        except Exception as e:
            self._report("step", e)
        finally:
            self._prev_logged = logged
            if self._capture is not None:
                self._capture.clear()
                self._capture.armed = self._predict_next_logged()
            if self._logits is not None:
                self._logits.clear()
            if self._updates is not None:
                self._updates.pending = step if logged else None

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
        step = evaluation.check_step(step)
        last = self._last_eval_step
        if last is not None and step < last:
            raise ValueError(f"step must not decrease between evaluate() calls: got {step} after {last}")
        items = evaluation.check_evaluation(loss, metrics)
        self._last_eval_step = step
        try:
            self._write(self._ensure_sink)
            if self._sink is not None:
                self._write(self._sink.write_vectors, step, evaluation.evaluation_vectors(items))
        except Exception as e:
            self._report("evaluate", e)

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

    def close(self) -> None:
        """Write what is pending, remove every hook, close a writer we created. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._exit_hook is not None:
            atexit.unregister(self._exit_hook)
            self._exit_hook = None
        try:
            self._flush_update_ratio()
        except Exception as e:
            self._report("close", e)
        self._live.evaluate(None)  # live findings (issue 23): what close() wrote, alerted too
        if self._capture is not None:
            self._capture.close()
        if self._logits is not None:
            self._logits.close()
        if self._updates is not None:
            self._updates.close()
        if self._sink is not None:
            self._write(self._sink.close if self._own_writer else self._sink.flush)

    # ------------------------------------------------------------- helpers
    def _selected(self, name: str) -> bool:
        if self._include and not any(fnmatch.fnmatchcase(name, p) for p in self._include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self._exclude)

    def _report(self, where: str, exc: BaseException) -> None:
        warn_once(self._warned, where, exc, stacklevel=3)

    def _write(self, fn: Callable[..., None], *args: Any) -> None:
        """Call a sink method; a failing disk or a removed logdir is one warning, not a crash."""
        try:
            fn(*args)
        except Exception as e:
            self._report("writing the event file", e)

    def _predict_next_logged(self) -> bool:
        """Arm activation capture when the next step() is likely a logged one."""
        if self._last_step is None:
            return True
        delta = 1
        if self._prev_step is not None:
            delta = max(1, self._last_step - self._prev_step)
        return self.should_log(self._last_step + delta)

    def _out_device(self) -> torch.device:
        for _, p in self._params:
            return reductions._local(p).device
        return torch.device("cpu")

    # ------------------------------------------------------------- logging
    def _log(self, step: int, loss_items: list[tuple[str, Any]]) -> None:
        """Compute everything on the device (every rank), move it to the host once, write (one rank)."""
        # Under no_grad rather than with .detach() per tensor: a detach costs a few
        # microseconds, which is 13 ms per logged step for 2,000 parameters here.
        try:
            with torch.no_grad():
                self._log_values(step, loss_items)
        finally:  # every rank reaches the stop's collective, even where this step's values failed
            self._live_step(step)

    def _live_step(self, step: int) -> None:
        """live findings (issue 23): evaluate, then decide on every rank together whether to stop here."""
        live = self._live
        live.evaluate(step)
        if live.stop_on is None or live.should_stop:
            return
        if decide_stop(live, self._out_device()):
            live.should_stop = True
            if self._sink is not None:
                self._write(self._sink.write_vectors, step, stopped_items(live.stop_on))

    def _log_values(self, step: int, loss_items: list[tuple[str, Any]]) -> None:
        """One logged step: every value reduced on the device, brought to the host in one copy, written."""
        device = self._out_device()
        with_grad = [(n, p) for n, p in self._params if p.grad is not None]
        grad_names = [n for n, _ in with_grad]
        weight_names = [n for n, _ in self._params]
        grads = [reductions.dense_values(reductions._local(p.grad)) for _, p in with_grad]
        weights = [reductions._local(p) for _, p in self._params]
        sites = self._capture.take() if self._capture is not None else []
        site_totals = self._capture.totals(sites, device) if sites else None
        sharded = distributed.any_sharded(p for _, p in self._params)
        reduce = self._ranks_agree(grad_names, weight_names, sites, site_totals, loss_items, device)
        keep_norms = reduce or not sharded  # a shard's own norm is not the tensor's

        parts: list[torch.Tensor] = []  # everything for the host, concatenated once
        g_norm, g_max = reductions.norms_and_max_abs(grads, device)
        w_norm, flat_w = reductions.norms_and_flat(weights, device)  # flat_w: many small parameters
        if self._updates is not None:  # the pre-step hook reuses them: weights are the same until opt.step()
            self._updates.offer_weight_norms(step, weights, w_norm, flat_w)
        if sharded and reduce:
            g_norm, g_max, w_norm = distributed.reduce_sharded_norms(
                g_norm,
                g_max,
                w_norm,
                distributed.shard_weights([p for _, p in with_grad], device),
                distributed.shard_weights([p for _, p in self._params], device),
            )
        scaler_parts = 0
        if self._scaler is not None:
            # AMP: before `unscale_` the gradients are multiplied by the scale.
            scale = amp.scale_tensor(self._scaler, device)
            if not amp.already_unscaled(self._scaler, self._optimizer):
                g_norm, g_max = g_norm / scale, g_max / scale
            found_inf = amp.found_inf(self._scaler, self._optimizer, device)
            parts += [scale] + ([found_inf] if found_inf is not None else [])
            scaler_parts = 1 + (found_inf is not None)
        total = torch.linalg.vector_norm(g_norm).reshape(1) if grads else torch.zeros(0, device=device)
        parts += [g_norm, g_max, w_norm, total]
        if sites:
            parts.append(distributed.finish_sites(site_totals, reduce))
        loss_names, loss_values, spread_names, spreads = loss_tensors(loss_items, device, reduce)
        parts += [loss_values, spreads]
        # Issue 15: the head's logits (the writing rank's batch) and Adam's state (not for shards).
        field = self._logits.take(device) if self._logits is not None else []
        field += optim_state.adam_state(self._params, self._optimizer, device) if not sharded else []
        parts += [values for _, _, values in field]
        preclip = self._grad_norm_preclip  # as given: it is the global norm already
        if preclip is not None:
            parts.append(torch.as_tensor(reductions._local(preclip) if torch.is_tensor(preclip) else preclip))

        # Read back in the order gathered above.
        host = _Host(torch.cat([p.reshape(-1).to(device=device, dtype=torch.float32) for p in parts]).cpu().numpy())
        scaler_vals = host.take(scaler_parts)
        P, W = len(grads), len(weights)
        gn, gm, wn, tot = host.take(P), host.take(P), host.take(W), host.take(1 if grads else 0)
        nonfinite = np.zeros(P, dtype=np.float32)
        bad = [i for i in range(P) if not math.isfinite(gn[i])]
        if bad:  # only here: counting over every tensor is slow (PERF_NOTES.md)
            counts = reductions.nonfinite_counts([grads[i] for i in bad])
            if sharded and reduce:
                counts = distributed.sum_counts(counts)  # every rank sees the same `bad`
            nonfinite[bad] = counts
        if self._sink is None:
            return  # not the writing rank: the collectives above were its share

        items: list[_Item] = []
        if P and keep_norms:
            items += [
                ("grad_norm", grad_names, (), gn),
                ("grad_max_abs", grad_names, (), gm),
                ("grad_nonfinite", grad_names, (), nonfinite),
                ("grad_norm_total", [""], (), tot),
            ]
        if W and keep_norms:
            items.append(("weight_norm", weight_names, (), wn))
        if self._scaler is not None:
            items += _amp_items(scaler_vals, any_nonfinite=bool(bad))
        if sites:
            items += _site_items(sites, host.take(4 * len(sites)).reshape(len(sites), 4))
        items += _loss_items(host, loss_names, spread_names)
        items += [(metric, names, (), host.take(len(names))) for metric, names, _ in field]
        if preclip is not None:
            items.append((metadata.GRAD_NORM_PRECLIP, [""], (), host.take(1)))
        items += self._parameter_state_items(weight_names)
        self._write(self._sink.write_vectors, step, items)
        self._write_structure_if_new(step, sites)

    def _ranks_agree(self, grad_names, weight_names, sites, site_totals, loss_items, device) -> bool:
        """Under torch.distributed, whether the ranks reduce this step's values together (they must hold
        the same parameters with gradients, sites and loss names); True without torch.distributed."""
        if not distributed.active():
            return True
        signature = self._signature(grad_names, weight_names, sites, site_totals, loss_items)
        if distributed.agree(signature, device):
            return True
        self._report(
            "torch.distributed",
            RuntimeError(
                "ranks disagree on parameters with gradients, activation sites or loss names; "
                "recording rank-local values on such steps"
            ),
        )
        return False

    def _parameter_state_items(self, weight_names: list[str]) -> list[_Item]:
        """Which parameters got no gradient (a detached branch), and each parameter group's learning rate."""
        items: list[_Item] = []
        if weight_names:
            missing = np.array([p.grad is None for _, p in self._params], "f4")
            items.append((optim_state.GRAD_MISSING, weight_names, (), missing))
        if self._optimizer is not None:
            groups = self._optimizer.param_groups
            lr_names = [""] if len(groups) == 1 else [f"group{i}" for i in range(len(groups))]
            lrs = np.array([_to_float(g.get("lr", float("nan"))) for g in groups])
            items.append(("learning_rate", lr_names, (), lrs))
        return items

    def _write_structure_if_new(self, step: int, sites: list) -> None:
        """The model's structure, again whenever a step shows an activation site it did not list."""
        site_names = tuple(s.name for s in sites)
        if self._structure_sites is not None and set(site_names) <= set(self._structure_sites):
            return
        self._structure_sites = tuple(sorted(set(site_names) | set(self._structure_sites or ())))
        known = [self._capture.sites[n] for n in self._capture.order] if self._capture is not None else []
        tree = module_tree(self.model, {n for n, _ in self._params}, known, self._optimizer)
        self._write(self._sink.write_structure, step, tree)

    def _signature(self, grad_names, weight_names, sites, site_totals, loss_items) -> list[float]:
        """What the ranks must agree on before reducing (see distributed.agree)."""
        site_names = [f"{s.name}\t{s.kind}" for s in sites]
        units = sum(site_totals.unit_counts) if site_totals is not None else 0
        per_sample = [n for n, v in loss_items if is_per_sample(v)]
        return [
            len(grad_names), _name_hash(grad_names),
            len(weight_names), _name_hash(weight_names),
            len(sites), _name_hash(site_names), float(units),
            len(loss_items), _name_hash([n for n, _ in loss_items]), _name_hash(per_sample),
        ]

    def _flush_update_ratio(self) -> None:
        if self._updates is None:
            return
        result = self._updates.take()
        if result is None or self._sink is None:
            return
        step, names, ratio = result
        self._write(self._sink.write_vectors, step, [("update_ratio", names, (), ratio.cpu().numpy())])

    def _flush_at_exit(self) -> None:
        if self._closed or self._sink is None:
            return
        try:
            self._flush_update_ratio()
            self._sink.close() if self._own_writer else self._sink.flush()
        except Exception:
            pass  # the interpreter is going away: nothing left to warn


# (metric, layer names, layer types, values): one vector the summary sink writes.
_Item = tuple[str, Sequence[str], Sequence[str], np.ndarray]


class _Host:
    """A logged step's values on the host, handed out in the order they were gathered."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.offset = 0

    def take(self, n: int) -> np.ndarray:
        out = self.values[self.offset : self.offset + n]
        self.offset += n
        return out


def _amp_items(scaler_vals: np.ndarray, any_nonfinite: bool) -> list[_Item]:
    """The GradScaler's scale and whether it skips this step."""
    if scaler_vals.size == 2:
        skipped = float(scaler_vals[1] > 0 or not np.isfinite(scaler_vals[1]))
    else:  # not unscaled yet: the scaler will skip exactly when a gradient is not finite
        skipped = float(any_nonfinite)
    return [("amp_scale", [""], (), scaler_vals[:1]), ("amp_skipped", [""], (), np.array([skipped]))]


def _site_items(sites: list, block: np.ndarray) -> list[_Item]:
    """Activation metrics from each site's [dead, saturated, mean, std] row: dead_fraction for the
    ReLU family, saturation for sigmoid/tanh, mean and std for every site."""
    names = [s.name for s in sites]
    types = [s.type_name for s in sites]
    relu = [i for i, s in enumerate(sites) if s.kind == "relu"]
    sat = [i for i, s in enumerate(sites) if s.kind in ("sigmoid", "tanh")]
    items: list[_Item] = []
    if relu:
        items.append(("dead_fraction", [names[i] for i in relu], [types[i] for i in relu], block[relu, 0]))
    if sat:
        items.append(("saturation", [names[i] for i in sat], [types[i] for i in sat], block[sat, 1]))
    return items + [("act_mean", names, types, block[:, 2]), ("act_std", names, types, block[:, 3])]


def _loss_items(host: _Host, loss_names: list[str], spread_names: list[str]) -> list[_Item]:
    """The loss components, then each per-sample spread statistic over the per-sample components."""
    items: list[_Item] = []
    if loss_names:
        items.append(("loss", loss_names, (), host.take(len(loss_names))))
    if spread_names:
        sp = host.take(len(SPREAD_METRICS) * len(spread_names)).reshape(len(spread_names), -1)
        items += [(metric, spread_names, (), sp[:, j]) for j, metric in enumerate(SPREAD_METRICS)]
    return items


def _flush_at_exit(ref: weakref.ReferenceType[Diagnostics]) -> None:
    diag = ref()
    if diag is not None:
        diag._flush_at_exit()


def _logdir_of(writer: Any) -> Optional[str]:
    get = getattr(writer, "get_logdir", None)
    try:
        return str(get()) if callable(get) else None
    except Exception:
        return None


def _to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")
