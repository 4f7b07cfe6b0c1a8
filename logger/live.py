"""Findings in the training process: the tab's rules engine on what the logger writes, alerts, stop.

`LiveFindings` sees every vector and structure document the logger writes
(an observer of `Diagnostics`), keeps them per tag as the tab would read
them back (the tab's default retention, `DEFAULT_SAMPLES` steps per tag),
and runs `tb_diag_plugin.findings.analyze` (the same engine as the tab and
`tb-diag report`, imported) after each logged step. A finding that reaches
`alert` is announced once through `logging.getLogger("tb_diag")`, again only
when its severity gets worse; one that reaches `stop_on` asks training to
stop. Under torch.distributed only the writing rank holds values: the stop
is decided on every rank by one all-reduce (MAX) of its flag on logged steps,
which every rank reaches together, so every rank stops at the same step.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tb_diag_plugin import findings as engine
from tb_diag_plugin import metadata
from tb_diag_plugin.findings import model_info
from tb_diag_plugin.findings.series import Series
from tb_diag_plugin.serving.config import DEFAULT_SAMPLES

LOG = logging.getLogger("tb_diag")
# Severities `alert=` and `stop_on=` accept (or None: off); `info` findings never alert or stop.
LEVELS = ("error", "warning")
_PY_LEVEL = {"error": logging.ERROR, "warning": logging.WARNING}
STOPPED = metadata.STOPPED  # the event-file record of a stop

_Item = tuple[str, Sequence[str], Sequence[str], np.ndarray]

# Evaluations on logged steps take at most this share of the run's wall time (the rules cost tens of
# ms per evaluation on a few hundred layers, benchmarks/RESULTS.md "Findings in the training process"),
# the one about to run counted as long as the last; a logged step over the budget waits for a later one,
# except when it holds a NaN/Inf (the `nonfinite` rule's metrics), which is evaluated at once, as is close().
EVAL_SHARE = 0.02
# What the `nonfinite` rule reads: a non-finite value here is evaluated at once.
_URGENT = frozenset(m for r in engine.RULES if "nonfinite" in r.kinds for m in r.metrics) - {"amp_scale"}


def check_level(value: Any, name: str) -> Optional[str]:
    """`alert=` / `stop_on=` as a severity in LEVELS or None; ValueError naming it otherwise."""
    if value is None or (isinstance(value, str) and value in LEVELS):
        return value
    raise ValueError(f"{name} must be one of {LEVELS} or None, got {value!r}")


class _Tag:
    """One tag's steps and values, as the reader merges them: growable, at most `limit` steps."""

    def __init__(self, metric: str, layers: Sequence[str], types: Sequence[str], limit: int) -> None:
        self.metric, self.layers, self.types, self.limit = metric, list(layers), list(types), limit
        self.steps = np.zeros(16, dtype=np.int64)
        self.values = np.zeros((16, len(self.layers)), dtype=np.float32)
        self.n = 0

    def append(self, step: int, values: np.ndarray) -> None:
        if self.n == self.steps.size:
            if self.n >= self.limit:
                self._thin()
            else:
                grow = min(self.limit, 2 * self.n)
                self.steps = np.resize(self.steps, grow)
                self.values = np.resize(self.values, (grow, len(self.layers)))
        self.steps[self.n] = step
        self.values[self.n] = values
        self.n += 1

    def _thin(self) -> None:
        """Full: keep every other older step (the first stays), like a reservoir that always keeps the latest."""
        keep = np.r_[np.arange(0, self.n - 1, 2), self.n - 1]
        k = keep.size
        self.steps[:k], self.values[:k] = self.steps[keep], self.values[keep]
        self.n = k

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values), sorted by step, the later write winning where a step was written twice."""
        steps, values = self.steps[: self.n], self.values[: self.n]
        if steps.size > 1 and not bool(np.all(steps[1:] > steps[:-1])):
            uniq, last = np.unique(steps[::-1], return_index=True)
            return uniq, values[steps.size - 1 - last]
        return steps, values


def _series(metric: str, tags: list[_Tag]) -> Series:
    """The tags of one metric merged as `tb_diag_plugin.reading` merges them (tags in name order)."""
    names: list[str] = []
    types: dict[str, str] = {}
    for t in tags:
        for i, n in enumerate(t.layers):
            if n not in types:
                names.append(n)
                types[n] = t.types[i] if t.types else ""
    L = len(names)
    parts = [(*t.view(), t) for t in tags if t.n]
    if not parts:
        return Series(metric, names, [types[n] for n in names], np.zeros(0, np.int64), np.zeros((0, L), np.float32),
                      np.zeros((0, L), bool))
    if len(parts) == 1 and parts[0][2].layers == names:
        steps, values, _ = parts[0]
        return Series(metric, names, [types[n] for n in names], steps, values, np.broadcast_to(np.True_, values.shape))
    col = {n: j for j, n in enumerate(names)}
    steps = np.unique(np.concatenate([p[0] for p in parts]))
    values = np.full((steps.size, L), np.nan, dtype=np.float32)
    present = np.zeros((steps.size, L), dtype=bool)
    for tag_steps, matrix, t in parts:
        rows = np.searchsorted(steps, tag_steps)[:, None]
        cols = np.array([col[n] for n in t.layers], dtype=np.int64)[None, :]
        values[rows, cols] = matrix
        present[rows, cols] = True
    return Series(metric, names, [types[n] for n in names], steps, values, present)


class LiveFindings:
    """The findings of the run being trained, from the values written to its event file.

    Args:
        alert: announce a finding once it reaches this severity ("error",
            "warning", or None for no alerts).
        stop_on: ask training to stop once a finding reaches this severity
            (None: never).
        where: the run's log directory, for the alert's pointer to the tab.
        report: called with (place, exception) when something here fails; training goes on.
        limit: steps kept per tag (the tab's default retention).
        share: the largest share of wall time that evaluations on logged steps may take.
        clock: the wall clock the share is measured with (tests give their own).
    """

    def __init__(self, alert: Optional[str], stop_on: Optional[str], where: Optional[str],
                 report: Callable[[str, BaseException], None], limit: int = DEFAULT_SAMPLES,
                 share: float = EVAL_SHARE, clock: Callable[[], float] = time.perf_counter) -> None:
        self.alert = check_level(alert, "alert")
        self.stop_on = check_level(stop_on, "stop_on")
        self.where = where
        self.limit = limit
        self.share = share
        self._clock = clock
        self._since: Optional[float] = None  # when the first values arrived: the budget's clock
        self._urgent = False  # a NaN/Inf arrived since the last evaluation
        self._report = report
        self._tags: dict[str, _Tag] = {}
        self._structure: Optional[dict] = None
        self._found: list[engine.Finding] = []
        self._dirty = False
        self._announced: dict[str, int] = {}  # finding kind -> severity rank announced
        self.wants_stop = False  # this rank's findings reached stop_on
        self.should_stop = False  # the decision every rank shares
        self.stop_reason: list[engine.Finding] = []
        self.on_alert: list[Callable[[engine.Finding, str], None]] = []  # the callbacks' channels
        self.eval_s = 0.0  # seconds spent evaluating, and how often (benchmarks read these)
        self.evaluations = 0
        self._last_eval_s = 0.0  # the last evaluation's time: the next one is expected to cost as much
        self._nonfinite_tags: set[str] = set()  # tags that brought a NaN/Inf already (`_urgent` once each)

    # ----------------------------------------------------------- recording
    def observe_vectors(self, step: int, items: Sequence[_Item]) -> None:
        """Keep what is written at `step` (a `Diagnostics` observer: every item of the event file)."""
        try:
            for metric, layers, types, values in items:
                tag = metadata.vector_tag(metric, layers)
                t = self._tags.get(tag)
                if t is None:
                    t = self._tags[tag] = _Tag(metric, layers, types, self.limit)
                values = np.asarray(values, dtype=np.float32).reshape(-1)
                t.append(int(step), values)
                # The first NaN/Inf of a tag is evaluated at once; later ones wait for the budget like the rest.
                if metric in _URGENT and tag not in self._nonfinite_tags and (
                        not bool(np.isfinite(values).all()) or (metric == "grad_nonfinite" and values.any())):
                    self._nonfinite_tags.add(tag)
                    self._urgent = True
            self._dirty = True
            if self._since is None:
                self._since = self._clock()
        except Exception as e:
            self._report("findings in the training process", e)

    def observe_structure(self, step: int, doc: dict) -> None:
        """Keep the latest structure document, as it reads back from the event file."""
        try:
            self._structure = json.loads(json.dumps(doc))
            self._dirty = True
        except Exception as e:
            self._report("findings in the training process", e)

    def series(self) -> dict[str, Series]:
        """Every recorded metric as the reader would build it."""
        by_metric: dict[str, list[_Tag]] = {}
        for tag in sorted(self._tags):
            by_metric.setdefault(self._tags[tag].metric, []).append(self._tags[tag])
        return {m: _series(m, tags) for m, tags in by_metric.items()}

    # ---------------------------------------------------------- evaluation
    def findings(self) -> list[engine.Finding]:
        """The current findings, worst first (evaluated again only if something was written since)."""
        if self._dirty:
            self.evaluate(None)
        return list(self._found)

    def evaluate(self, step: Optional[int]) -> None:
        """Run the rules on what is held; alert; note whether to stop.

        `step`: a logged step, evaluated within the time budget (`share`) unless it brought a NaN/Inf;
        None (close(), findings()): evaluated now."""
        if not self._dirty or (step is not None and not self.listening):
            return  # with neither alert nor stop_on, findings() evaluates when asked
        t0 = self._clock()
        if step is not None and not self._urgent and self._since is not None:
            # Counting the evaluation about to run (as long as the last one): the share is never overshot.
            if self.eval_s + self._last_eval_s > self.share * (t0 - self._since):
                return  # over budget: a later logged step (or close) evaluates
        try:
            self._urgent = False
            model, _ = model_info.read_model(lambda: self._structure)
            self._found, _ = engine.analyze(self.series(), model=model)
            self._dirty = False
            self._last_eval_s = self._clock() - t0
            self.eval_s += self._last_eval_s
            self.evaluations += 1
            self._alert(self._found)
            if self.stop_on is not None and not self.wants_stop:
                limit = metadata.SEVERITY_RANK[self.stop_on]
                reason = [f for f in self._found if metadata.SEVERITY_RANK[f.severity] <= limit]
                if reason:
                    self.wants_stop, self.stop_reason = True, reason
        except Exception as e:
            self._dirty = False  # one failure, one warning: not a retry on every step
            self._report("findings in the training process", e)

    @property
    def listening(self) -> bool:
        """Whether an evaluation during training can do anything (alert or stop); else findings() alone evaluates."""
        return self.alert is not None or self.stop_on is not None

    def at_logged_step(self, step: int, writer: Any, device: Any, emit: Callable[[int, list[_Item]], None]) -> None:
        """After a logged step's values (every rank, even where they failed): evaluate, then decide on
        every rank together whether to stop here; the writing rank (`writer` not None) records the stop."""
        if self.where is None and writer is not None:
            self.where = logdir_of(writer)
        self.evaluate(step)
        if self.stop_on is None or self.should_stop:
            return
        if decide_stop(self, device):
            self.should_stop = True
            if writer is not None:
                emit(step, stopped_items(self.stop_on))

    def _alert(self, found: list[engine.Finding]) -> None:
        if self.alert is None:
            return
        limit = metadata.SEVERITY_RANK[self.alert]
        for f in found:
            rank = metadata.SEVERITY_RANK[f.severity]
            if rank > limit or self._announced.get(f.kind, len(metadata.SEVERITIES)) <= rank:
                continue  # below the level, or announced already at this severity or worse
            self._announced[f.kind] = rank
            line = alert_line(f, self.where)
            LOG.log(_PY_LEVEL[f.severity], line)
            for hook in self.on_alert:
                hook(f, line)

    def announced(self) -> dict[str, str]:
        """Finding kind -> the severity it was last announced at."""
        return {k: metadata.SEVERITIES[r] for k, r in self._announced.items()}


def alert_line(f: engine.Finding, where: Optional[str]) -> str:
    """One line: the kind, severity, step, layers, the message and the fix, and where the tab shows it."""
    steps = f"step {f.first_step}" if f.first_step == f.last_step else f"steps {f.first_step}-{f.last_step}"
    layers = ", ".join(f.layers[:4]) + (f", ... ({len(f.layers)} in all)" if len(f.layers) > 4 else "")
    tab = f"tensorboard --logdir {where}" if where else "tensorboard --logdir <your logdir>"
    return (f"tb-diag {f.severity}: {f.kind} from {steps}" + (f" in {layers}" if layers else "")
            + f": {f.message} Try: {f.suggestion} See {tab} -> Diagnostics.")


def stop_line(step: int, stop_on: str, reason: Sequence[engine.Finding]) -> str:
    """Why training stops, for the frameworks' logs."""
    kinds = ", ".join(f"{f.kind} (from step {f.first_step})" for f in reason) or "a finding on another rank"
    return f"tb-diag: stopping training at step {step} (stop_on={stop_on!r}): {kinds}."


def stopped_items(stop_on: str) -> list[_Item]:
    """The event-file record of a stop: at the step it happened, the severity `stop_on` named (its rank)."""
    return [(STOPPED, [""], (), np.array([metadata.SEVERITY_RANK[stop_on]], dtype=np.float32))]


def decide_stop(live: Optional[LiveFindings], device: Any) -> bool:
    """Whether every rank stops now: this rank's wish, MAX over ranks (a collective on a logged step)."""
    import torch

    from tb_diag_logger import distributed

    wish = bool(live is not None and live.wants_stop)
    if not distributed.active():
        return wish
    flag = torch.tensor([1.0 if wish else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


def logdir_of(writer: Any) -> Optional[str]:
    """A SummaryWriter's log directory (the alert's pointer to the tab), or None."""
    get = getattr(writer, "get_logdir", None)
    try:
        return str(get()) if callable(get) else None
    except Exception:
        return None
