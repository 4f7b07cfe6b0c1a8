"""Background reading: the read-ahead (a run the tab opened) and the preload (a run TensorBoard loaded).

Both read what the findings need, then the findings, then the run's other
metrics into the store, so that the tab's findings come first and its views
find their data in memory; both yield to the requests in flight
(`RunStore.wait_idle`) before each metric, and both stop with `close()`.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
import weakref
from typing import Optional

from tensorboard import context as tb_context

from tb_diag_plugin import metadata
from tb_diag_plugin.reading import RunIndex
from tb_diag_plugin.serving.store import RunStore

logger = logging.getLogger(__name__)

# One-column metrics (the whole model's and the loss) first: they are cheap and the overview draws them.
_SMALL_FIRST: dict[str, int] = {}
for _m in metadata.LOSS_METRICS + metadata.MODEL_METRICS + metadata.ALL_METRICS:
    _SMALL_FIRST.setdefault(_m, len(_SMALL_FIRST))  # a name's first place: ALL_METRICS repeats the small ones


def read_order(idx: RunIndex) -> tuple[list[str], list[str]]:
    """(the findings' inputs, the other metrics) of a run, each in the order they are read: the
    contract's small metrics first, unknown ones last."""
    from tb_diag_plugin.findings import INPUTS  # the rules: not needed at TensorBoard's start-up

    order = sorted(idx.tags, key=lambda m: (_SMALL_FIRST.get(m, len(_SMALL_FIRST)), m))
    return [m for m in order if m in INPUTS], [m for m in order if m not in INPUTS]


def read_order_all(inputs: list[str], others: list[str]) -> list[str]:
    """Every metric, the contract's small ones first (the overview draws them), then the rest."""
    return sorted(inputs + others, key=lambda m: (_SMALL_FIRST.get(m, len(_SMALL_FIRST)), m))


def read_whole_run(store: RunStore, ctx, eid: str, run: str, idx: RunIndex) -> None:
    """What the findings read, the findings, then every other metric of a run into the store, then each
    metric's step-binned summary (what the views' first visits are answered from), then what the model
    view is made from; yielding to the requests in flight before each."""
    from tb_diag_plugin.serving import model_data  # the model view's parts: not needed at start-up

    inputs, others = read_order(idx)
    # series_and_key: a metric too big for the cache is only indexed here; its summary then reads it a
    # piece at a time, and later requests read only their window.
    work = [functools.partial(store.series_and_key, ctx, eid, run, m, idx) for m in inputs]
    work.append(functools.partial(store.findings, ctx, eid, run, idx))
    work += [functools.partial(store.series_and_key, ctx, eid, run, m, idx) for m in others]
    work += [functools.partial(store.step_summary, ctx, eid, run, m, idx) for m in read_order_all(inputs, others)]
    work.append(functools.partial(model_data.warm, store, ctx, eid, run, idx))
    for read in work:
        store.wait_idle()
        if store.closed.is_set():
            return
        read()


class ReadAhead:
    """Reads the runs the tab asks about, one at a time in one thread, each at most once per
    `config.read_ahead_interval_s` (a live run changes every few seconds; the views re-read what they show)."""

    def __init__(self, store: RunStore) -> None:
        self._store = store
        self._queue: queue.Queue[Optional[tuple]] = queue.Queue()
        self._seen: dict[tuple[str, str], float] = {}
        self._queued: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None

    def request(self, ctx, eid: str, run: str, idx: RunIndex, now: bool = False) -> None:
        """Read `run` in the background unless it was read recently (`now`: unless it is queued already)."""
        t = time.monotonic()
        with self._lock:
            if self._store.closed.is_set() or (eid, run) in self._queued:
                return
            last = self._seen.get((eid, run))
            if not now and last is not None and t - last < self._store.config.read_ahead_interval_s:
                return
            self._seen[(eid, run)] = t
            self._queued.add((eid, run))
            self._queue.put((ctx, eid, run, idx))
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="tb-diag-read-ahead", daemon=True)
                self.thread.start()

    def mark_read(self, eid: str, run: str) -> None:
        """`run` was just read by someone else (the preload)."""
        with self._lock:
            self._seen[(eid, run)] = time.monotonic()

    def _loop(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=30)
            except queue.Empty:
                return  # a new thread starts with the next job
            if job is None or self._store.closed.is_set():
                return
            ctx, eid, run, idx = job
            try:
                read_whole_run(self._store, ctx, eid, run, idx)
            except Exception:  # the request that needs the data reports the error
                logger.debug("read-ahead of run %r failed", run, exc_info=True)
            finally:
                with self._lock:
                    self._queued.discard((eid, run))

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop the thread after the metric it is reading (the store must be closed first)."""
        self._queue.put(None)
        thread = self.thread
        if thread is not None:
            thread.join(timeout)


class Preloader:
    """Once TensorBoard has loaded a run (its data unchanged between two looks), reads it as the
    read-ahead does, newest runs first, while the series cache holds less than `config.preload_budget`."""

    def __init__(self, store: RunStore, read_ahead: ReadAhead) -> None:
        self._store = store
        self._read_ahead = read_ahead
        self._preloaded: dict[str, tuple] = {}  # run -> the data version it was preloaded at
        self._lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Look at the runs in a thread of its own until `close()` (or until the preloader is gone)."""
        self.thread = threading.Thread(target=_preload_loop, args=(weakref.ref(self), self._store),
                                       name="tb-diag-preload", daemon=True)
        self.thread.start()

    def preloaded_runs(self) -> dict[str, tuple]:
        """Runs the preload has read, each with the data version it read."""
        with self._lock:
            return dict(self._preloaded)

    def read_run(self, ctx, eid: str, run: str, idx: RunIndex) -> None:
        """Read one run into the store (a seam for tests of failure handling)."""
        read_whole_run(self._store, ctx, eid, run, idx)

    def look(self, seen: dict[str, tuple]) -> int:
        """One look at the runs: preload those whose data did not change since the last look
        (`seen`, updated here) and was not preloaded yet, newest first. Returns how many it read;
        a run that fails to read is not tried again until its data changes."""
        ctx, eid = tb_context.RequestContext(), ""
        runs = self._store.index(ctx, eid)
        settled = []
        for run, idx in runs.items():
            version = idx.data_version()
            if idx.tags and seen.get(run) == version and self._preloaded.get(run) != version:
                settled.append((_newest_wall_time(idx), run, version))
            seen[run] = version
        with self._lock:
            for gone in set(seen) - set(runs):
                del seen[gone]
                self._preloaded.pop(gone, None)
        done = 0
        budget = self._store.config.preload_budget
        for _, run, version in sorted(settled, key=lambda t: (-t[0], t[1])):
            if self._store.series_cache.size >= budget:
                logger.info("diagnostics preload stopped: %d MiB of series in memory",
                            self._store.series_cache.size >> 20)
                break
            if self._store.closed.is_set():
                break
            try:
                self.read_run(ctx, eid, run, runs[run])
                done += 1
            except Exception:  # this run only: tried again when its data changes; the tab's requests report it
                logger.debug("preloading run %r failed", run, exc_info=True)
            with self._lock:
                self._preloaded[run] = version
            self._read_ahead.mark_read(eid, run)
        return done

    def close(self, timeout: Optional[float] = None) -> None:
        """Wait for the thread to end (the store must be closed first: that is what stops it)."""
        thread = self.thread
        if thread is not None:
            thread.join(timeout)


def _newest_wall_time(idx: RunIndex) -> float:
    """When a run last gained a step, from its listing stamps (both loaders put the wall time second)."""
    times = [st[1] for st in idx.stamps.values() if isinstance(st, tuple) and len(st) > 1 and st[1] is not None]
    return max(times, default=0.0)


def _preload_loop(ref: weakref.ref[Preloader], store: RunStore) -> None:
    """The preload thread: looks at the runs until the store closes or the preloader is gone."""
    seen: dict[str, tuple] = {}
    failures = 0
    changing = True  # TensorBoard is starting: runs are about to appear
    config = store.config
    while failures < config.preload_max_failures:
        if store.closed.wait(config.preload_settle_poll_s if changing else config.preload_poll_s):
            return
        preloader = ref()
        if preloader is None:
            return  # the TensorBoard that made it is gone
        before = dict(seen)
        try:
            preloader.look(seen)
            failures = 0
        except Exception:  # the data provider not up yet, or gone; a request would report it
            failures += 1
            logger.debug("diagnostics preload failed", exc_info=True)
        changing = seen != before or failures > 0
        del preloader
