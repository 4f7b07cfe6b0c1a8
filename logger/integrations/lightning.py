"""`DiagnosticsCallback`: tb-diag for PyTorch Lightning (`lightning.pytorch` and `pytorch_lightning`).

    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from tb_diag_logger.integrations.lightning import DiagnosticsCallback

    trainer = Trainer(logger=TensorBoardLogger("runs"), callbacks=[DiagnosticsCallback(every=20)])

How it maps onto Lightning's loop (2.x):

- The step number is `trainer.global_step` before the optimizer step it
  describes (0 for the first), as a plain loop's `enumerate` would count.
- `Diagnostics.step()` runs in `on_before_optimizer_step`: after the backward
  passes of every accumulated batch (and AMP's unscale), before gradient
  clipping, so `grad_norm_total` is the norm before clipping. In automatic
  optimisation Lightning runs that hook inside `optimizer.step(closure)`; the
  update ratio is taken across the actual update (see `updates.py`).
- Activations: Lightning calls `training_step`, not `forward`; the callback
  makes the module's `training_step` an entry of activation capture.
- The input scale is read at the module's forward; when `training_step`
  calls a submodule (`self.net(x)`) that forward never runs, and the input is
  the first floating-point tensor of the logged step's batches
  (`on_train_batch_start`), counted only if the forward recorded none. The
  logits are then that submodule's output if it holds every parameter of the
  module (`collectors/logits.py`).
- The loss is the sum of the losses handed to backward since the previous
  optimizer step (`on_before_backward`): in automatic optimisation those are
  the training step's loss divided by `accumulate_grad_batches`, so their sum
  is the mean over the accumulated batches, what `outputs["loss"]` adds up to;
  in manual optimisation, what `manual_backward` got. A loss scaled by AMP's
  scaler is unscaled.
- Several optimizers (manual optimisation): each optimizer step is a step
  (Lightning's `global_step` counts them all); the update ratio covers the
  parameters of the optimizer that stepped; `learning_rate` is the first
  optimizer's.
- Writer: the `SummaryWriter` of the trainer's `TensorBoardLogger`, so the
  diagnostics land beside Lightning's own scalars; without one, a writer of
  its own in `trainer.log_dir`. Only global rank 0 writes; under DDP every
  rank takes part in the reductions.
- Alerts and stopping (`alert=`, `stop_on=`, as for `Diagnostics`): each
  alert is one line through the `tb_diag` logger; a stop sets
  `trainer.should_stop` at the logged step on every rank (Lightning ends
  `fit` after that batch) and says why through Lightning's rank-zero log
  (`rank_zero_info`, where Lightning reports its own early stops).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from typing import Any, Optional, Sequence, Union

import torch

from tb_diag_logger import hooks
from tb_diag_logger.collectors.inputs import InputScale, first_float_input
from tb_diag_logger.diagnostics import DEFAULT_EVERY, Diagnostics, _patterns, check_every, warn_once
from tb_diag_logger.live import check_level, stop_line

_PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def _callback_bases() -> tuple[type, ...]:
    """The `Callback` class of each Lightning package in use (already imported), else of each installed one."""
    loaded = [p for p in _PACKAGES if p in sys.modules]
    bases = []
    for name in loaded or _PACKAGES:
        try:
            bases.append(importlib.import_module(name).Callback)
        except Exception:  # not installed, or an install that fails to import: the other package may do
            continue
    if not bases:
        raise ImportError(
            "tb_diag_logger.integrations.lightning needs PyTorch Lightning: pip install lightning "
            "(or pytorch-lightning)"
        )
    return tuple(bases)


class _DiagnosticsHooks:
    """The callback's behaviour; `DiagnosticsCallback` adds Lightning's `Callback` base(s)."""

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        *,
        include: Union[str, Sequence[str], None] = None,
        exclude: Union[str, Sequence[str], None] = None,
        activations: bool = True,
        update_ratio: bool = True,
        alert: Optional[str] = "error",
        stop_on: Optional[str] = None,
    ) -> None:
        """Record diagnostics every `every` optimizer steps; the options are those of `Diagnostics`."""
        self.every = check_every(every)
        _patterns(include, "include")
        _patterns(exclude, "exclude")
        self._options = {
            "include": include, "exclude": exclude, "activations": bool(activations),
            "update_ratio": bool(update_ratio), "alert": check_level(alert, "alert"),
            "stop_on": check_level(stop_on, "stop_on"),
        }
        self.diagnostics: Optional[Diagnostics] = None
        self._module: Any = None  # the LightningModule whose training_step we wrapped
        self._loss: Optional[torch.Tensor] = None  # losses handed to backward since the last optimizer step
        self._inputs: Optional[InputScale] = None  # the input scale of the Diagnostics in use
        self._batch_inputs: tuple[int, list[torch.Tensor]] = (-1, [])  # (logged step, its batches' inputs)
        self._warned: set[str] = set()
        self._live: Any = None  # the last run's live findings, kept after fit() for findings()

    def findings(self) -> list:
        """The findings of the run being (or last) trained, as `Diagnostics.findings()`."""
        return self._live.findings() if self._live is not None else []

    # ------------------------------------------------------------ lifecycle
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Create the `Diagnostics` (optimizers and the process group exist by now)."""
        self._close()
        try:
            self._start(trainer, pl_module)
        except Exception as e:
            self._report("starting", e)

    def _start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        writer, logdir = _writer_of(trainer)
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        diag = Diagnostics(
            pl_module, writer, logdir=logdir, every=self.every,
            optimizer=optimizers[0] if optimizers else None,
            scaler=scaler if isinstance(scaler, torch.amp.GradScaler) else None,
            **self._options,
        )
        self.diagnostics = diag
        self._live = diag._live
        self._inputs = next((c for c in diag.collectors if isinstance(c, InputScale)), None)
        if diag._updates is not None:
            for opt in optimizers[1:]:
                diag._updates.watch(opt)
        if diag._capture is not None:
            # Lightning calls training_step, not forward: make it an entry of capture.
            hooks.set_attribute(pl_module, "training_step", diag._capture.wrap_entry(pl_module.training_step))
            self._module = pl_module

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Write what is pending and remove every hook (before Lightning closes its logger's writer)."""
        self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Also close when training stopped with an exception."""
        self._close()

    def _close(self) -> None:
        if self._module is not None:
            hooks.del_attribute(self._module, "training_step")  # the class's method again
            self._module = None
        diag, self.diagnostics = self.diagnostics, None
        self._loss, self._inputs, self._batch_inputs = None, None, (-1, [])
        if diag is not None:
            try:
                diag.close()
            except Exception as e:
                self._report("closing", e)

    # ----------------------------------------------------------------- steps
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Keep a logged step's batch input (a reference: no copy, no device work until the step)."""
        diag, step = self.diagnostics, trainer.global_step
        if diag is None or self._inputs is None or not diag.should_log(step):
            return
        try:
            x = _batch_input(batch)
            if x is not None:
                # a new step drops what a step without an optimizer step left (manual optimisation)
                kept = self._batch_inputs[1] if self._batch_inputs[0] == step else []
                self._batch_inputs = (step, [*kept, x])
        except Exception as e:  # never into the training loop
            self._report("input scale", e)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        """Add a backward pass's loss to the step's (only for a step that will be logged)."""
        diag = self.diagnostics
        if diag is None or not diag.should_log(trainer.global_step) or not isinstance(loss, torch.Tensor):
            return
        try:
            value = loss.detach().float()
            scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
            if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled():
                value = value / scaler.get_scale()  # Lightning hands the scaled loss to this hook
            self._loss = value if self._loss is None else self._loss + value
        except Exception as e:
            self._report("loss", e)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Record the step: gradients are complete, the weights not yet updated."""
        diag = self.diagnostics
        if diag is None:
            return
        loss, self._loss = self._loss, None
        (at, inputs), self._batch_inputs = self._batch_inputs, (-1, [])
        if inputs and at == trainer.global_step and self._inputs is not None:
            try:
                self._inputs.feed(inputs)  # only if training_step never called the module's own forward
            except Exception as e:
                self._report("input scale", e)
        try:
            diag.step(trainer.global_step, loss=loss)
            if diag.should_stop and not trainer.should_stop:
                trainer.should_stop = True
                _rank_zero_info(stop_line(trainer.global_step, diag._live.stop_on, diag._live.stop_reason))
        except Exception as e:  # never into the training loop
            self._report("step", e)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """The validation the user logs (`self.log("val_loss", ...)` in `validation_step`) at `global_step`:
        the first logged `val*` number whose name holds "loss" becomes `val_loss`, the other `val*`
        numbers `val_metric`s. Lightning's sanity check before training is left out."""
        diag = self.diagnostics
        if diag is None or getattr(trainer, "sanity_checking", False):
            return
        try:
            loss, metrics = _validation_numbers(getattr(trainer, "callback_metrics", {}) or {})
            if loss is not None or metrics:
                diag.evaluate(trainer.global_step, loss=loss, metrics=metrics or None)
        except Exception as e:  # never into the training loop
            self._report("evaluate", e)

    def _report(self, where: str, exc: BaseException) -> None:
        warn_once(self._warned, f"the Lightning callback ({where})", exc, stacklevel=2)


def _batch_input(batch: Any) -> Optional[torch.Tensor]:
    """The first floating-point tensor of a batch (a tensor, a tuple or list, a mapping), as the input scale
    picks one among a forward's arguments; None if there is none (token ids)."""
    if isinstance(batch, torch.Tensor):
        return first_float_input((batch,), {})
    if isinstance(batch, Mapping):
        return first_float_input((), batch)
    if isinstance(batch, (tuple, list)):
        return first_float_input(tuple(batch), {})
    return None


def _rank_zero_info(message: str) -> None:
    """Lightning's rank-zero log (of the package in use), where it reports its own early stops."""
    for name in [p for p in _PACKAGES if p in sys.modules] or _PACKAGES:
        try:
            importlib.import_module(name + ".utilities").rank_zero_info(message)
            return
        except Exception:
            continue


def _validation_numbers(logged: Any) -> tuple[Optional[float], dict[str, float]]:
    """(validation loss, other validation numbers) from Lightning's `callback_metrics`."""
    loss, metrics = None, {}
    for name, value in logged.items():
        if not str(name).startswith("val"):
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = float(value.detach().float().item())
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if loss is None and "loss" in str(name):
            loss = float(value)
        else:
            metrics[str(name)] = float(value)
    return loss, metrics


def _writer_of(trainer: Any) -> tuple[Any, Optional[str]]:
    """(writer, logdir) for `Diagnostics`: the TensorBoardLogger's SummaryWriter on rank 0, else a logdir;
    (None, None) on the other ranks."""
    if not getattr(trainer, "is_global_zero", True):
        return None, None
    from torch.utils.tensorboard import SummaryWriter

    for logger in getattr(trainer, "loggers", None) or []:
        if type(logger).__name__ == "TensorBoardLogger":
            experiment = logger.experiment
            if isinstance(experiment, SummaryWriter):
                return experiment, None
            return None, logger.log_dir  # tensorboardX's writer: our own, in the same run directory
    return None, trainer.log_dir or trainer.default_root_dir


class DiagnosticsCallback(_DiagnosticsHooks):
    """A Lightning `Callback` that records tb-diag diagnostics while `Trainer.fit` runs.

    ``Trainer(callbacks=[DiagnosticsCallback(every=20)])``, with ``lightning``
    or ``pytorch_lightning``: an instance is also an instance of the
    ``Callback`` of each Lightning package imported when it is created (of
    each installed one if none is). Options: those of `Diagnostics`
    (``include``, ``exclude``, ``activations``, ``update_ratio``). The
    `Diagnostics` in use is ``callback.diagnostics`` while training runs. See
    the module docstring for what each step records.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> DiagnosticsCallback:
        bases = _callback_bases()
        sub = _SUBCLASSES.get((cls, bases))
        if sub is None:
            sub = _SUBCLASSES[(cls, bases)] = type(
                cls.__name__, (cls, *bases), {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
            )
        return super().__new__(sub)

    def __reduce__(self) -> tuple:
        # The class is made per set of packages: rebuild through __new__ (ddp_spawn pickles callbacks).
        return (_rebuild, (type(self).__mro__[1], self.every, self._options))


_SUBCLASSES: dict[tuple[type, tuple[type, ...]], type] = {}


def _rebuild(cls: type, every: int, options: dict[str, Any]) -> DiagnosticsCallback:
    return cls(every, **options)


__all__ = ["DiagnosticsCallback"]
