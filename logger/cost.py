"""What logging costs this training job, measured as it runs: one warning when it is a lot.

The benchmarks measure the logger on three models; a user's model may be
nothing like them (benchmarks/wide_model.py: 1,000 tiny blocks, where a
logged step costs as much as a training step). Rather than let such a job
run slower without a word, the logger times its own parts on each logged
step: the logged forward over the median of recent forwards that were not
captured, `step()`'s own work, and the update-ratio hooks. Against the
median time between two `step()` calls, that gives the share of training
time diagnostics take at the chosen cadence. Three logged steps in a row
above COST_WARN_SHARE give one `DiagnosticsCostWarning` naming the parts,
so that the user can choose a larger `every` or turn the costly part off.
Nothing is timed but our own hooks and `step()`: an evaluation pass or a
slow data loader does not count against us.

Every time is CPU time of this process (`clock`), not wall time: on a busy
machine another job stretches the wall time of whatever we happen to be
running, and a logged step that waited for a core is not an expensive one.
A logged step counts against us only when its cost also stands out of the
spread of the steps that were not logged (their interquartile range): when
the machine makes unlogged steps vary by more than logging adds, we cannot
tell, and say nothing. CPU time is not enough on its own: threads that wait
for a descheduled peer spin, so a contended machine inflates the CPU time of
many small operations (logging) more than of a few large ones (training). So
where Linux tells how long the training thread waited for a CPU since the
last logged step, a machine that kept it waiting over BUSY_WAIT of the time
is too busy to tell, and nothing is counted.
"""

from __future__ import annotations

import statistics
import threading
import time
import warnings
from collections import deque
from typing import Any, Callable, Optional

COST_WARN_SHARE = 0.05  # of training time, at the chosen cadence
# ... and only if a logged step costs at least this much: a toy model's 1 ms steps make any
# logging a large share of little time, which nobody needs to be told about.
COST_WARN_MIN_S = 0.010
STREAK = 3  # logged steps in a row over it before warning: one slow step is noise
_WINDOW = 15  # recent steps whose medians are the baseline
# CPU seconds of the whole process (every thread torch computes in): what the job spends, not what it waits.
clock = time.process_time
BUSY_WAIT = 0.10  # of the wall time spent waiting for a CPU: another job competes for the cores


class DiagnosticsCostWarning(UserWarning):
    """Logging diagnostics takes a noticeable share of this job's training time (reported once)."""


class CostMeter:
    """Times what logging adds, per logged step, against the steps that were not logged."""

    def __init__(self, every: int, run_delay: Optional[Callable[[], Optional[float]]] = None) -> None:
        self.every = every
        self._run_delay = run_delay or _run_delay  # seconds this thread waited for a CPU, or None
        self._last_call: Optional[float] = None
        self._intervals: deque[float] = deque(maxlen=_WINDOW)  # between two step() calls, neither logged
        self._forwards: deque[float] = deque(maxlen=_WINDOW)  # training forwards that were not captured
        self._pending: Optional[tuple[Optional[float], float]] = None  # (forward extra, step() work)
        self._streak = 0
        self._waits = (threading.get_ident(), time.monotonic(), self._run_delay())  # at the last settle
        self.warned = False
        # The last logged step measured: forward, step() and update-ratio seconds, and the share.
        self.last: Optional[dict[str, float]] = None
        self._previous_logged = False  # the step() before was logged (`at_step`)

    def at_step(self, logged: bool, capture: Any, updates: Any, tensors: int,
                report: Callable[[str, BaseException], None]) -> Optional[float]:
        """`Diagnostics.step()`'s share: settle the logged step before (its optimizer hooks have run
        since; `DiagnosticsCostWarning` once), then `step_called`. `capture` and `updates` are the
        activation capture and the update ratio (or None); `tensors`: how many parameters are measured.
        Returns what capture added to this step's forward, for `logged`; a failure here is `report`ed."""
        try:
            return self._at_step(logged, capture, updates, tensors)
        except Exception as e:  # a meter must not cost the step its diagnostics
            report("cost meter", e)
            return None

    def _at_step(self, logged: bool, capture: Any, updates: Any, tensors: int) -> Optional[float]:
        previous, self._previous_logged = self._previous_logged, logged
        if previous:
            hooks_s = 0.0
            if updates is not None:
                hooks_s, updates.cost_s = updates.cost_s, 0.0
            sites = len(capture.sites) if capture is not None else 0
            message = self.settle(hooks_s, lambda: f"{sites} activation sites, {tensors} parameter tensors")
            if message is not None:
                warnings.warn(message, DiagnosticsCostWarning, stacklevel=4)  # at the user's diag.step()
        forward = capture.take_forward_time() if capture is not None else None
        return self.step_called(clock(), logged, previous, forward)

    def step_called(self, now: float, logged: bool, previous_logged: bool,
                    forward: Optional[tuple[float, bool]]) -> Optional[float]:
        """At each `step()`: `forward` is (seconds, captured) of the step's training forwards.
        Returns what capture added to a captured forward (0 without capture, None before a baseline)."""
        if self._last_call is not None and not logged and not previous_logged:
            self._intervals.append(now - self._last_call)
        self._last_call = now
        if forward is None:
            return 0.0
        seconds, captured = forward
        if not captured:
            if not logged:
                self._forwards.append(seconds)
            return 0.0
        if not self._forwards:
            return None
        return max(0.0, seconds - statistics.median(self._forwards))

    def logged(self, forward_extra: Optional[float], step_s: float) -> None:
        """A logged step's forward extra and `step()` work; its update-ratio hooks run after it."""
        self._pending = (forward_extra, step_s)

    def settle(self, hooks_s: float, detail: Callable[[], str]) -> Optional[str]:
        """At the `step()` after a logged one: that step's whole cost. The warning's text the first
        time STREAK logged steps in a row were over COST_WARN_SHARE, else None."""
        pending, self._pending = self._pending, None
        waited = self._waited_share()
        if pending is None or pending[0] is None or len(self._intervals) < 3 or self.warned:
            return None
        forward_s, step_s = pending
        cost = forward_s + step_s + hooks_s
        period = self.every * statistics.median(self._intervals)
        share = cost / period if period > 0 else 0.0
        self.last = {"forward_s": forward_s, "step_s": step_s, "update_ratio_s": hooks_s, "share": share}
        noise = _spread(self._intervals)  # a whole unlogged step's own variation: it holds the forward's
        costly = share > COST_WARN_SHARE and cost >= COST_WARN_MIN_S and cost > noise
        costly = costly and (waited is None or waited <= BUSY_WAIT)
        self.last.update(noise_s=noise, waited=-1.0 if waited is None else waited)
        self._streak = self._streak + 1 if costly else 0
        if self._streak < STREAK:
            return None
        self.warned = True
        parts = [("activation capture (the logged forward)", forward_s, "activations=False"),
                 ("step()", step_s, None), ("the update ratio (optimizer hooks)", hooks_s, "update_ratio=False")]
        biggest = max(parts, key=lambda p: p[1])
        hint = f"pass a larger every= (now {self.every})"
        if biggest[2] is not None:
            hint += f", or {biggest[2]}: {biggest[0]} is the largest part"
        spent = ", ".join(f"{name} {seconds * 1e3:.0f} ms" for name, seconds, _ in parts)
        return (
            f"tb-diag: logging diagnostics takes about {share:.0%} of this job's training time "
            f"({cost * 1e3:.0f} ms per logged step: {spent}; {detail()}; a step without diagnostics takes "
            f"{period / self.every * 1e3:.0f} ms). To reduce it, {hint}. Reported once."
        )

    def _waited_share(self) -> Optional[float]:
        """Share of the wall time since the last call that this thread waited for a CPU (None: unknown)."""
        ident, now, delay = threading.get_ident(), time.monotonic(), self._run_delay()
        (was, then, before), self._waits = self._waits, (ident, now, delay)
        if delay is None or before is None or was != ident or now <= then or delay < before:
            return None  # unknown, or another thread's counter
        return (delay - before) / (now - then)


def _run_delay() -> Optional[float]:
    """Seconds the calling thread has waited on a run queue (Linux schedstat); None where not available."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _spread(seconds: deque[float]) -> float:
    """Interquartile range: how much a step varies by itself, without the one outlier."""
    if len(seconds) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(seconds, n=4)
    return q3 - q1
