"""Diagnostics inside a Hugging Face `transformers.Trainer`.

    from tb_diag_logger.integrations.transformers import DiagnosticsCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[DiagnosticsCallback(every=20)])

The callback writes through the Trainer's own TensorBoard writer (its
`TensorBoardCallback`, `report_to=["tensorboard"]`), so the diagnostics and
the Trainer's `train/loss` are one run in one event file. Without that
callback it writes where the Trainer would: `$TENSORBOARD_LOGGING_DIR`, else
`<output_dir>/runs/<stamp>`.

The Trainer gives callbacks neither the loss nor the gradient norm. The
callback finds the Trainer that calls it (once, at `on_train_begin`, on the
call stack) and reads both where the Trainer computes them: the value each
`training_step` returns (the micro-batch loss the Trainer adds up for its own
`loss` log, summed here over the micro-batches of one optimizer step) and
the value `_get_grad_norm` returns (the pre-clip norm the Trainer logs as
`grad_norm`). Its methods are wrapped on that one instance for the duration
of `train()` and restored afterwards.

Step numbers are the Trainer's `global_step` of the optimizer step (the
number the Trainer logs it under), so step k here is `train/loss` at step k.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable, Optional, Sequence, Union

from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.integrations.integration_utils import TensorBoardCallback, default_logdir

from tb_diag_logger.diagnostics import DEFAULT_EVERY, Diagnostics, warn_once

# Trainer methods whose return values the callback records, first found wins.
_LOSS_METHODS = ("training_step",)
_GRAD_NORM_METHODS = ("_get_grad_norm", "_clip_grad_norm")


class DiagnosticsCallback(TrainerCallback):
    """A `transformers.TrainerCallback` that runs `tb_diag_logger.Diagnostics` inside `Trainer.train()`.

    Records, at the first and every `every`-th optimizer step: the training loss of the whole
    step (all gradient-accumulation micro-batches, as the Trainer sums it),
    the learning rate of each parameter group, the pre-clip global gradient
    norm the Trainer computes (``grad_norm_preclip``; ``grad_norm_total`` is
    after clipping), per-parameter gradient and weight norms, the update
    ratio of the optimizer step (through accelerate's wrapper), and
    activation statistics of the step's training forwards. Under
    torch.distributed every process takes part and only the world's process
    zero writes.

    Args:
        every: log every `every`-th optimizer step (Trainer `global_step`).
        include, exclude, activations, update_ratio: as for `Diagnostics`.
    """

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        *,
        include: Union[str, Sequence[str], None] = None,
        exclude: Union[str, Sequence[str], None] = None,
        activations: bool = True,
        update_ratio: bool = True,
    ) -> None:
        self._options = dict(every=every, include=include, exclude=exclude, activations=activations,
                             update_ratio=update_ratio)
        # Bad options fail here, at the user's line, not inside train(): Diagnostics checks them.
        Diagnostics(nn.Module(), _NoWriter(), **self._options).close()
        self.diagnostics: Optional[Diagnostics] = None
        self._tap: Optional[_TrainerTap] = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Create the `Diagnostics` on the Trainer's model, optimizer and TensorBoard writer."""
        self._finish()
        trainer = _calling_trainer(self)
        if trainer is None:
            self._warn("finding the Trainer", RuntimeError(
                "the Trainer that runs this callback was not found on the call stack: "
                "the loss and grad_norm_preclip are not recorded"))
        try:
            where: dict[str, Any] = {}
            if state.is_world_process_zero:
                writer = _trainer_writer(trainer, args)
                where = {"writer": writer} if writer is not None else {"logdir": _trainer_logdir(args)}
            model = model if model is not None else getattr(trainer, "model", None)
            self.diagnostics = _TrainerDiagnostics(model, optimizer=optimizer, **where, **self._options)
        except Exception as e:  # a callback must not stop training from starting
            self._warn("setting up", e)
            return
        if trainer is not None:
            self._tap = _TrainerTap(trainer, self._warn)

    def on_step_begin(self, args, state, control, **kwargs):
        if self._tap is not None and self.diagnostics is not None:
            self._tap.reset(active=self.diagnostics.should_log(state.global_step + 1))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """After backward and clipping, before `optimizer.step()`: the moment `Diagnostics.step()` is for."""
        diag = self.diagnostics
        if diag is None:
            return
        tap = self._tap
        loss, grad_norm = (tap.loss, tap.grad_norm) if tap is not None else (None, None)
        try:
            # The Trainer increments global_step after this step and logs it under the new number.
            diag.step(state.global_step + 1, loss=loss, grad_norm=grad_norm)
        except Exception as e:
            self._warn("step", e)
        if tap is not None:
            tap.reset(active=False)

    def on_optimizer_step(self, args, state, control, **kwargs):
        # The update ratio is measured inside optimizer.step(); write it now, not at the next
        # logged step or at on_train_end, when the Trainer's writer may be closed already.
        if self.diagnostics is not None:
            try:
                self.diagnostics._write_late()
            except Exception as e:
                self._warn("update_ratio", e)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """The Trainer's evaluation (`eval_loss` and the other `eval_*` numbers) at its `global_step`."""
        evaluate = getattr(self.diagnostics, "evaluate", None)
        if evaluate is None or not metrics:
            return
        try:
            loss = metrics.get("eval_loss")
            others = {
                k[len("eval_"):]: float(v)
                for k, v in metrics.items()
                if k.startswith("eval_") and k != "eval_loss" and _is_metric(v) and not k.endswith(_SPEED_SUFFIXES)
            }
            evaluate(state.global_step, loss=loss if _is_metric(loss) else None, metrics=others or None)
        except Exception as e:
            self._warn("evaluate", e)

    def on_train_end(self, args, state, control, **kwargs):
        self._finish()

    # ----------------------------------------------------------- helpers
    def _finish(self) -> None:
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        if self.diagnostics is not None:
            try:
                self.diagnostics.close()
            except Exception as e:
                self._warn("close", e)
            self.diagnostics = None

    def _warn(self, where: str, exc: BaseException) -> None:
        warn_once(self._warned, f"Trainer callback ({where})", exc)


class _TrainerDiagnostics(Diagnostics):
    """`Diagnostics` that also logs the Trainer's first step, numbered 1.

    Its loss is that of the initial weights: the early level that a
    diverging run is measured against, which `every` would skip.
    """

    def should_log(self, step: int) -> bool:
        """Step 1 and every `every`-th step."""
        return step == 1 or super().should_log(step)


class _TrainerTap:
    """Records what the Trainer's loss and gradient-norm methods return, on one Trainer instance."""

    def __init__(self, trainer: Trainer, on_error: Callable[[str, BaseException], None]) -> None:
        self._trainer = trainer
        self._on_error = on_error
        self._restore: list[tuple[str, Any]] = []  # (name, the instance attribute it had or _ABSENT)
        self.active = False
        self.loss: Any = None
        self.grad_norm: Any = None
        self._wrap(_LOSS_METHODS, self._add_loss)
        self._wrap(_GRAD_NORM_METHODS, self._set_grad_norm)

    def reset(self, active: bool) -> None:
        """Forget the values so far; record the coming ones only if `active` (a logged step)."""
        self.active, self.loss, self.grad_norm = active, None, None

    def _add_loss(self, value: Any) -> None:
        # Each micro-batch's loss, already divided the way the Trainer divides it for accumulation.
        value = value.detach()
        self.loss = value if self.loss is None else self.loss + value

    def _set_grad_norm(self, value: Any) -> None:
        if value is not None:
            self.grad_norm = value.detach() if hasattr(value, "detach") else value

    def _wrap(self, names: Sequence[str], record: Callable[[Any], None]) -> None:
        name = next((n for n in names if callable(getattr(self._trainer, n, None))), None)
        if name is None:
            self._on_error("reading the Trainer", AttributeError(f"the Trainer has none of {', '.join(names)}"))
            return
        original = getattr(self._trainer, name)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if self.active:
                try:
                    record(out)
                except Exception as e:  # recording must never cost the Trainer its step
                    self._on_error(f"reading {name}", e)
            return out

        self._restore.append((name, vars(self._trainer).get(name, _ABSENT)))
        setattr(self._trainer, name, wrapper)

    def remove(self) -> None:
        """Give the Trainer its methods back."""
        for name, before in reversed(self._restore):
            if before is _ABSENT:
                vars(self._trainer).pop(name, None)
            else:
                setattr(self._trainer, name, before)
        self._restore.clear()
        self.reset(active=False)


_ABSENT = object()
# The Trainer's speed numbers in evaluation metrics (`eval_runtime`, ...): not results of the model.
_SPEED_SUFFIXES = ("_runtime", "_per_second", "_preparation_time")


class _NoWriter:
    """Stands for a writer while the options are checked; nothing is written through it."""

    def _get_file_writer(self) -> None:
        raise RuntimeError("nothing is written while options are checked")

    def flush(self) -> None:
        pass


def _calling_trainer(callback: TrainerCallback) -> Optional[Trainer]:
    """The `Trainer` whose callback handler is calling `callback` now (callbacks are not given it)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer) and callback in getattr(obj.callback_handler, "callbacks", ()):
                return obj
            frame = frame.f_back
    finally:
        del frame  # a frame reference would keep every local of the stack alive
    return None


def _trainer_writer(trainer: Optional[Trainer], args: Any) -> Any:
    """The Trainer's TensorBoard `SummaryWriter`, created here (where it would create it) if it has none yet."""
    if trainer is None:
        return None
    tb = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
    if tb is None:
        return None
    if getattr(tb, "tb_writer", None) is None:
        # Our on_train_begin ran before its own: make the writer it would make, which it then keeps
        # (it creates one only when it has none) and closes at on_train_end.
        if getattr(tb, "logging_dir", None) is None:
            tb.logging_dir = _trainer_logdir(args)
        tb._init_summary_writer(args)
    return tb.tb_writer


def _trainer_logdir(args: Any) -> str:
    """Where the Trainer's TensorBoardCallback writes: `$TENSORBOARD_LOGGING_DIR`, else under `output_dir`."""
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    if env is not None:
        return os.path.expanduser(env)
    return os.path.join(args.output_dir, default_logdir())


def _is_metric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
