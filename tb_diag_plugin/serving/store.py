"""The run store: what the plugin has read through the data provider, cached per data version.

TensorBoard's own plugins keep no state (the data provider is the store);
this one caches for speed, so the caches, the listing, the integrity checker
and the bookkeeping that lets background work yield to requests live here,
in one object with a `close()`. No threads of its own but the integrity
checker's; the background readers (`background`) fill it.

Every cache is a part of one `cache.ByteLRU` (`config.cache_bytes`). A
metric whose merged series would take more than `config.max_series_bytes`
is not read whole: it is served on demand from the run's event files
(`reading.ondemand`), each request reading only the steps and layers it shows.
Each metric's step-binned summary (`reading.stepbins`, built in the background
once a run is read) answers the views' whole-run requests without binning.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import threading
import time
from typing import Any, Iterator, Optional

from tb_diag_plugin import cache, metadata
from tb_diag_plugin.reading import ALL_SAMPLES, RunIndex, Series, index_runs, integrity, read_series, read_structure
from tb_diag_plugin.reading.events import EventIndex
from tb_diag_plugin.reading.ondemand import OnDemandSeries, open_metric, release_memory
from tb_diag_plugin.reading.stepbins import StepSummary, summarize
from tb_diag_plugin.series import PIECE_BYTES, PiecewiseSeries
from tb_diag_plugin.serving import stopped
from tb_diag_plugin.serving.config import Config


class RunStore:
    """Listings, merged series, encoded answers and findings of the runs behind one data provider."""

    def __init__(self, provider: Any, logdir: str, config: Config) -> None:
        self.provider = provider
        self.logdir = logdir
        self.config = config
        self.memory = cache.ByteLRU(config.cache_bytes)  # the one budget of every part below
        # No entry of any part bigger than a series may be: one answer cannot push every other out.
        largest = config.max_series_bytes
        self.series_cache = self.memory.part("series", largest)
        self.answers = self.memory.part("answers", largest)
        self.findings_cache = self.memory.part("findings", largest)
        self.binned = self.memory.part("binned", largest)
        self.group_rows = self.memory.part("group_rows", largest)  # a grouped view's rows, per group and bins
        self.event_indexes = self.memory.part("events", largest)
        self.summaries = self.memory.part("summaries", largest)
        self._findings_recent: dict[tuple[str, str], tuple[float, dict]] = {}  # (eid, run) -> (until, answer)
        self._lock = threading.Lock()
        self._findings_put = threading.Condition(self._lock)
        self._listing: dict[str, tuple[float, dict[str, RunIndex]]] = {}
        # Requests being answered: background work waits while there are any, so that the view the
        # user is looking at does not share the CPU with it.
        self._busy = 0
        self._idle = threading.Condition(self._lock)
        self.closed = threading.Event()
        self.integrity = integrity.EventFileChecker(
            background=True, pause=self.wait_idle, inline_bytes=config.integrity_inline_bytes
        )

    # ------------------------------------------------------------ runs
    def index(self, ctx, eid: str) -> dict[str, RunIndex]:
        """The runs with diagnostics, listed at most once per `config.index_ttl_s`."""
        now = time.monotonic()
        with self._lock:
            hit = self._listing.get(eid)
        if hit is not None and now - hit[0] < self.config.index_ttl_s:
            return hit[1]
        runs = index_runs(self.provider, ctx, eid)
        with self._lock:
            self._listing[eid] = (now, runs)
        return runs

    def problems(self, run: str, idx: RunIndex) -> list[str]:
        """What cannot be shown for `run`: skipped tags, and damage in its event files."""
        return idx.problems + self.integrity.run_problems(self.logdir, run)

    # ---------------------------------------------------------- series
    def series(self, ctx, eid: str, run: str, metric: str, idx: RunIndex) -> tuple[Series, list[str]]:
        """A metric's merged series and its problems, cached until one of its tags gains a step; a metric
        too big for the cache is read whole from its event files and not kept."""
        series, problems, _ = self.series_and_key(ctx, eid, run, metric, idx)
        if isinstance(series, OnDemandSeries):
            return series.load(), problems
        return series, problems

    def series_and_key(self, ctx, eid: str, run: str, metric: str, idx: RunIndex):
        """(series, problems, cache key): the key names the data version the series was read at. The
        series is an `OnDemandSeries` (values read per request) when the metric does not fit
        `config.max_series_bytes` and the run's event files are local. Its `summary(build)` gives its
        step-binned summary (`summary_of`)."""
        series, problems, key = self._series_and_key(ctx, eid, run, metric, idx)
        series.summary = functools.partial(self.summary_of, series, key)
        series.summary_points = self.config.default_points  # its resolution: what requests' bins align to
        return series, problems, key

    def _series_and_key(self, ctx, eid: str, run: str, metric: str, idx: RunIndex):
        key = (eid, run, metric, idx.version(metric))
        hit = self.series_cache.peek(key)
        if hit is not None:
            return hit[0], hit[1], key
        limit = self.config.max_series_bytes
        run_dir = None if self.series_bytes(idx, metric) <= limit else integrity.run_directory(self.logdir, run)
        if run_dir is not None:
            events = self.event_index(run_dir, idx.version(metric))
            rows = max((events.tag(tag).arrays()[0].size for tag, _ in idx.tags[metric]), default=0)
            if self.series_bytes(idx, metric, rows) > limit:
                layers, types = idx.layers(metric)
                series, problems = self.series_cache.get(
                    key, lambda: open_metric(events, metric, idx.tags[metric], layers, types))
                return series, problems, key
        series, problems = self.series_cache.get(
            key, lambda: read_series(self.provider, ctx, eid, run, metric, idx, ALL_SAMPLES))
        return series, problems, key

    def step_summary(self, ctx, eid: str, run: str, metric: str, idx: RunIndex,
                     build: bool = True) -> Optional[StepSummary]:
        """The metric's step-binned summary at `config.default_points` (bins x tensors: mean, min, max,
        non-finite and present counts, and each tensor's last finite value), built here unless `build`
        is False; None when it does not fit the cache (the caller bins what it needs itself)."""
        series, _, key = self.series_and_key(ctx, eid, run, metric, idx)
        return self.summary_of(series, key, build)

    def summary_of(self, series, key: tuple, build: bool = True) -> Optional[StepSummary]:
        """The summary of `series` (read at cache key `key`): cached, or being built (waited for), or
        built now when `build`; None when it is none of these, or would not fit the cache."""
        points = self.config.default_points
        skey = (key, points)
        if not build:
            return self.summaries.wait(skey)
        bins = min(series.steps.size, points)
        # Three float32 and two uint16 per cell (present collapses to one per bin when every cell is recorded).
        if bins * len(series.layers) * 16 > min(self.config.max_series_bytes, self.memory.max_bytes):
            return None

        def build_summary():
            try:
                return summarize(series, points, self._previous_summary(key, points))
            finally:
                release_memory()

        summary = self.summaries.get(skey, build_summary)
        # The summaries of the metric's earlier versions served their extension: they go now, not when the
        # budget pushes out something a view still needs (a run loaded while it was read had a few).
        self.memory.drop(lambda k: not (isinstance(k, tuple) and k[:1] == (self.summaries.name,)
                                        and k[1][0][:3] == key[:3] and k[1] != skey))
        return summary

    def _previous_summary(self, key: tuple, points: int) -> Optional[StepSummary]:
        """The cached summary of an earlier version of the same metric (what a growing run extends)."""
        for older, at in reversed(self.summaries.keys()):
            if older[:3] == key[:3] and older != key and at == points:
                return self.summaries.peek((older, at))
        return None

    @staticmethod
    def series_bytes(idx: RunIndex, metric: str, rows: int | None = None) -> int:
        """What a metric's merged series would hold: its values (float32) and, over several tags, which
        cells are present; `rows` defaults to an upper bound from the listing (a count where the loader
        gives one, else the largest step + 1)."""
        entries = idx.tags.get(metric, [])
        if rows is None:
            rows = 0
            for tag, _ in entries:
                stamp = idx.stamps.get(tag) or ()
                if len(stamp) > 2 and stamp[2] is not None:
                    rows = max(rows, int(stamp[2]))
                elif stamp and stamp[0] is not None:
                    rows = max(rows, int(stamp[0]) + 1)
        cells = rows * len(idx.layers(metric)[0])
        return cells * (5 if len(entries) > 1 else 4)

    def event_index(self, run_dir: str, version: tuple) -> EventIndex:
        """The run directory's event index (kept in the cache), brought up to date once per `version`."""
        events, seen = self.event_indexes.get(run_dir, lambda: (EventIndex(run_dir), [None]))
        with self._lock:
            stale = seen[0] != version
            seen[0] = version
        if stale:
            events.refresh()
        return events

    # -------------------------------------------------------- findings
    def findings(self, ctx, eid: str, run: str, idx: RunIndex) -> dict:
        """The run's findings answer, cached per data version.

        While a run grows each poll brings a new version; the previous answer is kept for ten times
        as long as it took to compute (at most a minute), so a big live run is not re-analysed at
        every poll while a small one is.
        """
        # The rules: not needed at TensorBoard's start-up (tests/test_layering.py).
        from tb_diag_plugin.findings.run import analyze_run

        key = (eid, run, idx.data_version())
        hit = self.findings_cache.peek(key)
        if hit is not None:
            return hit
        recent = self._recent(eid, run, fresh=True)
        if recent is not None:
            return recent

        def compute():
            t0 = time.monotonic()
            read = self.rules_inputs(ctx, eid, run, idx)
            result = analyze_run(run, read,
                                 lambda: read_structure(self.provider, ctx, eid, run) if idx.structure_tag else None)
            answer = result.answer({m: idx.layers(m)[0] for m in idx.tags})
            if metadata.STOPPED in idx.tags:  # issue 23: when and why stop_on= stopped the run
                answer["stopped"] = stopped.describe(self.series(ctx, eid, run, metadata.STOPPED, idx)[0],
                                                     result.findings)
            del read
            release_memory()  # what the rules read and computed: freed, and given back
            done = time.monotonic()
            with self._lock:
                self._findings_recent[(eid, run)] = (done + min(60.0, 10 * (done - t0)), answer)
            return answer

        answer = self.findings_cache.get(key, compute)
        with self._findings_put:
            self._findings_put.notify_all()
        return answer

    def rules_inputs(self, ctx, eid: str, run: str, idx: RunIndex) -> dict[str, Any]:
        """The metrics the findings rules read (`findings.INPUTS`), as they read them: each cached series, or,
        for a metric too big for the cache, a `PiecewiseSeries` that reads a span of rows at a time (at most
        a cache entry's size) from the run's event files, so that no such metric is held whole."""
        from tb_diag_plugin import findings  # the rules: not needed at TensorBoard's start-up

        def read(metric: str):
            series = self.series_and_key(ctx, eid, run, metric, idx)[0]
            if isinstance(series, OnDemandSeries):
                return PiecewiseSeries(series, min(PIECE_BYTES, self.config.max_series_bytes))
            return series

        # Two reads at a time: a read mostly waits for the data server or numpy, which free the GIL.
        metrics = sorted(m for m in idx.tags if m in findings.INPUTS)
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tb-diag-findings") as pool:
            return dict(zip(metrics, pool.map(read, metrics)))

    def findings_if_ready(self, eid: str, run: str, idx: RunIndex, timeout: float) -> tuple[Optional[dict], bool]:
        """(answer, complete) without computing: the findings of the run's current data if they are
        computed within `timeout` seconds (by someone else), else the latest answer for an older
        version of the run (or None) with complete=False."""
        key = (eid, run, idx.data_version())
        deadline = time.monotonic() + timeout
        while True:
            hit = self.findings_cache.peek(key)
            if hit is not None:
                return hit, True
            recent = self._recent(eid, run, fresh=True)
            if recent is not None:
                return recent, True
            left = deadline - time.monotonic()
            if left <= 0 or self.closed.is_set():
                return self._recent(eid, run, fresh=False), False
            with self._findings_put:
                self._findings_put.wait(left)

    def _recent(self, eid: str, run: str, fresh: bool) -> Optional[dict]:
        with self._lock:
            recent = self._findings_recent.get((eid, run))
        if recent is None or (fresh and time.monotonic() >= recent[0]):
            return None
        return recent[1]

    # ------------------------------------------ requests and background
    @contextlib.contextmanager
    def foreground(self) -> Iterator[None]:
        """Marks a request's work: background work yields to it."""
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                if not self._busy:
                    self._idle.notify_all()

    def wait_idle(self) -> None:
        """Until no request is being answered (at most `config.read_ahead_yield_s`, so a busy tab
        cannot starve background work), or the store is closed."""
        with self._lock:
            self._idle.wait_for(lambda: self._busy == 0 or self.closed.is_set(),
                                timeout=self.config.read_ahead_yield_s)

    def close(self) -> None:
        """Wake every waiter and stop the integrity checker's scans; the caches stay readable."""
        self.closed.set()
        with self._lock:
            self._idle.notify_all()
            self._findings_put.notify_all()
        self.integrity.close()
