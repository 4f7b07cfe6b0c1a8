"""The TensorBoard side: loader (flags), plugin (routes) and the tab's static files.

TensorBoard imports this module at start-up through the `tensorboard_plugins`
entry point, so it imports neither torch nor plotly; plotly.js is loaded the
first time the tab asks for it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import gzip
import importlib.resources
import json
import logging
import mimetypes
import queue
import re
import struct
import threading
import time
import weakref
from typing import Any, Callable, Iterator, Optional

import numpy as np
from tensorboard import context as tb_context
from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from tb_diag_plugin import cache, downsample, integrity, metadata, reading

logger = logging.getLogger(__name__)

# Samples kept per diagnostics tag when the user gives no
# --samples_per_plugin=diagnostics=N. TensorBoard's own default for custom
# plugins is 10 (Python loader) or 100 (Rust data server), which would throw
# away almost all of a run's history. 20,000 logged steps x 500 layers is
# about 40 MB per metric in memory; --diagnostics_samples changes it.
DEFAULT_SAMPLES = 20_000

DEFAULT_POINTS = 1000
MAX_POINTS = 100_000
MAX_LAYERS_PER_REQUEST = 100_000
# Merged series kept in memory. A 20,000-step x 500-layer metric is 40 MB;
# one tour of the tab touches about ten metrics of each selected run.
SERIES_CACHE_BYTES = 1 << 30
# Encoded /values answers: the tab polls, and a repeated request on unchanged
# data is answered without binning and encoding again.
ANSWER_CACHE_BYTES = 64 << 20
# How long one listing of the runs serves the requests that follow it: a
# view's requests arrive together, and each listing is a gRPC round trip
# (~50 ms under the Rust data server here).
INDEX_TTL_SECONDS = 1.0
# A run is read ahead at most this often (seconds).
READ_AHEAD_INTERVAL = 60.0
# The longest the read-ahead waits for the requests in flight before it reads its next metric.
READ_AHEAD_YIELD_S = 5.0
# The order in which the read-ahead reads a run's metrics: the overview's first.
_READ_AHEAD = ("loss", "grad_norm_total", "learning_rate", "dead_fraction", "grad_norm", "weight_norm",
               "grad_nonfinite", "update_ratio", "grad_max_abs", "act_mean", "act_std", "saturation")
# Preloading: once TensorBoard has loaded a run (its data unchanged between two
# looks), the plugin reads it as the read-ahead does, so that the tab's first
# visit finds it in memory: through the data provider a 20,000-step x 500-layer
# run takes ~3 s to read and analyse (Rust data server here), ten times the
# 300 ms a view may take. TensorBoard itself reads every plugin's data before
# any tab asks; this is the plugin's share of that load. Runs are preloaded
# newest first while the series cache holds less than PRELOAD_BYTES;
# --diagnostics_preload false turns it off.
# Seconds between two looks: short while some run changed at the last look (TensorBoard loading it,
# or a job writing it), so that a run is read about a second after it settles; longer when nothing
# changes. A look costs ~3 ms of CPU here (one listing; 44 ms of wall time under the Rust server).
PRELOAD_POLL_S = 5.0
PRELOAD_SETTLE_POLL_S = 1.0
PRELOAD_BYTES = SERIES_CACHE_BYTES // 2
# The preload gives up after this many failed looks in a row (a data server gone for good: 5 minutes).
PRELOAD_MAX_FAILURES = 300
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*\.(js|css|svg|png)$")


class DiagnosticsLoader(base_plugin.TBLoader):
    """Gives the plugin a full-history retention default and its own flag."""

    def define_flags(self, parser) -> None:
        parser.add_argument(
            "--diagnostics_samples",
            type=int,
            default=DEFAULT_SAMPLES,
            metavar="N",
            help=(
                "Logged steps kept per Diagnostics metric (0 keeps all; default "
                f"{DEFAULT_SAMPLES}). --samples_per_plugin=diagnostics=N, if given, wins."
            ),
        )
        parser.add_argument(
            "--diagnostics_preload",
            choices=("true", "false"),
            default="true",
            help=(
                "Read each run's diagnostics and findings into memory once TensorBoard has loaded it, "
                "so that the Diagnostics tab opens without waiting (default true; it costs about as "
                f"much CPU as opening the tab, and up to {PRELOAD_BYTES >> 20} MiB of memory)."
            ),
        )

    def fix_flags(self, flags) -> None:
        samples = getattr(flags, "diagnostics_samples", DEFAULT_SAMPLES)
        if samples is None:
            samples = DEFAULT_SAMPLES
        if not isinstance(samples, int) or samples < 0:
            raise base_plugin.FlagsError(f"--diagnostics_samples must be >= 0, got {samples!r}")
        spp = getattr(flags, "samples_per_plugin", None)
        if isinstance(spp, str):  # configure(samples_per_plugin="a=1") skips the parser
            spp = dict(
                (k.strip(), int(v)) for k, v in (t.split("=") for t in spp.split(",") if t.strip())
            )
        spp = dict(spp or {})
        spp.setdefault(metadata.PLUGIN_NAME, samples)
        flags.samples_per_plugin = spp

    def load(self, context) -> DiagnosticsPlugin:
        return DiagnosticsPlugin(context)


def _json_route(fn: Callable) -> Callable:
    """Turn typed errors and bad input into 4xx JSON; never a traceback."""

    @functools.wraps(fn)
    @wrappers.Request.application
    def wrapper(self, request):
        try:
            return fn(self, request)
        except errors.PublicError as e:
            return http_util.Respond(
                request, {"error": str(e)}, "application/json", code=e.http_code
            )
        except Exception as e:  # a bug of ours: logged in full, answered without a traceback
            logger.exception("diagnostics route %s failed", request.path)
            return http_util.Respond(
                request, {"error": f"internal error ({type(e).__name__}); see the TensorBoard log"},
                "application/json", code=500,
            )

    return wrapper


def _foreground_route(fn: Callable) -> Callable:
    """A data route: while it is answered, the background work (read-ahead, integrity scans) waits."""

    @functools.wraps(fn)
    def wrapper(self, request):
        with self._foreground():
            return fn(self, request)

    return wrapper


def _arg_int(request, name: str, default: Optional[int], lo: int, hi: int) -> Optional[int]:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise errors.InvalidArgumentError(f"{name} must be an integer, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise errors.InvalidArgumentError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


class DiagnosticsPlugin(base_plugin.TBPlugin):
    """Serves the Diagnostics tab and its data."""

    plugin_name = metadata.PLUGIN_NAME

    def __init__(self, context) -> None:
        self._provider = context.data_provider
        self._logdir = getattr(context, "logdir", "") or ""
        self._integrity = integrity.EventFileChecker(background=True, pause=self._wait_idle)
        self._series = cache.ByteLRU(SERIES_CACHE_BYTES)
        self._answers = cache.ByteLRU(ANSWER_CACHE_BYTES)
        self._findings = cache.ByteLRU(16 << 20)
        self._findings_recent: dict[tuple[str, str], tuple[float, dict]] = {}  # (eid, run) -> (until, answer)
        self._lock = threading.Lock()
        self._listing: dict[str, tuple[float, dict[str, reading.RunIndex]]] = {}
        self._read_ahead: queue.Queue[tuple] = queue.Queue()
        self._read_ahead_seen: dict[tuple[str, str], float] = {}
        self._read_ahead_thread: Optional[threading.Thread] = None
        # Requests being answered: the read-ahead waits while there are any, so
        # that the view the user is looking at does not share the CPU with it.
        self._busy = 0
        self._idle = threading.Condition(self._lock)
        self._static = importlib.resources.files("tb_diag_plugin.frontend_static")
        self._preloaded: dict[str, tuple] = {}  # run -> the data version it was preloaded at
        self._preload_thread: Optional[threading.Thread] = None
        flags = getattr(context, "flags", None)
        if self._logdir and getattr(flags, "diagnostics_preload", "true") != "false":
            self._preload_thread = threading.Thread(
                target=_preload_loop, args=(weakref.ref(self),), name="tb-diag-preload", daemon=True
            )
            self._preload_thread.start()

    # ---------------------------------------------------------- TBPlugin
    def get_plugin_apps(self) -> dict[str, Callable]:
        return {
            "/index.js": self._serve_index,
            "/static/*": self._serve_static,
            "/plotly.js": self._serve_plotly,
            "/runs": self._serve_runs,
            "/tags": self._serve_tags,
            "/values": self._serve_values,
            "/structure": self._serve_structure,
            "/findings": self._serve_findings,
        }

    def is_active(self) -> bool:
        return False  # the frontend asks the data provider (plugins_listing)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Diagnostics")

    # ------------------------------------------------------------ static
    def _static_file(self, name: str) -> Optional[bytes]:
        if not _STATIC_NAME.match(name) or ".." in name:
            return None
        node = self._static
        for part in name.split("/"):
            node = node.joinpath(part)
        try:
            return node.read_bytes() if node.is_file() else None
        except OSError:
            return None

    def _respond_static(self, request, name: str):
        body = self._static_file(name)
        if body is None:
            raise errors.NotFoundError(f"no static file {name[:200]!r}")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if name.endswith(".js"):
            ctype = "application/javascript"
        return http_util.Respond(request, body, ctype)

    @_json_route
    def _serve_index(self, request):
        return self._respond_static(request, "index.js")

    @_json_route
    def _serve_static(self, request):
        prefix = "/static/"
        path = request.path
        name = path[path.index(prefix) + len(prefix) :] if prefix in path else ""
        return self._respond_static(request, name)

    @_json_route
    def _serve_plotly(self, request):
        return http_util.Respond(
            request, _plotly_gz(), "application/javascript", content_encoding="gzip", expires=3600
        )

    # -------------------------------------------------------------- data
    def _ctx(self, request):
        return plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)

    def _index(self, request) -> tuple[Any, str, dict[str, reading.RunIndex]]:
        ctx, eid = self._ctx(request)
        return ctx, eid, self._index_for(ctx, eid)

    def _index_for(self, ctx, eid: str) -> dict[str, reading.RunIndex]:
        """The runs with diagnostics, listed at most once per INDEX_TTL_SECONDS."""
        now = time.monotonic()
        with self._lock:
            hit = self._listing.get(eid)
        if hit is not None and now - hit[0] < INDEX_TTL_SECONDS:
            return hit[1]
        runs = reading.index_runs(self._provider, ctx, eid)
        with self._lock:
            self._listing[eid] = (now, runs)
        return runs

    def _problems(self, run: str, idx: reading.RunIndex) -> list[str]:
        """What cannot be shown for `run`: skipped tags, and damage in its event files."""
        return idx.problems + self._integrity.run_problems(self._logdir, run)

    def _run(self, request, runs: dict[str, reading.RunIndex]) -> str:
        run = request.args.get("run")
        if run is None:
            raise errors.InvalidArgumentError("missing parameter: run")
        if run not in runs:
            raise errors.NotFoundError(f"no diagnostics for run {run[:200]!r}")
        return run

    @_json_route
    def _serve_runs(self, request):
        _, _, runs = self._index(request)
        body = [
            {
                "run": run,
                "metrics": sorted(idx.tags),
                "has_structure": idx.structure_tag is not None,
                "problems": self._problems(run, idx),
            }
            for run, idx in runs.items()
        ]
        return http_util.Respond(request, {"runs": body}, "application/json")

    @_json_route
    def _serve_tags(self, request):
        ctx, eid, runs = self._index(request)
        run = self._run(request, runs)
        idx = runs[run]
        self._start_read_ahead(ctx, eid, run, idx)
        metrics = {}
        for metric in sorted(idx.tags):
            layers, types = idx.layers(metric)
            metrics[metric] = {"layers": layers, "layer_types": types}
        return http_util.Respond(
            request,
            {
                "run": run,
                "metrics": metrics,
                "has_structure": idx.structure_tag is not None,
                "problems": self._problems(run, idx),
            },
            "application/json",
        )

    def series(self, ctx, eid: str, run: str, metric: str, idx: reading.RunIndex) -> tuple[reading.Series, list[str]]:
        """A metric's merged series, cached until one of its tags gains a step."""
        return self._series_and_key(ctx, eid, run, metric, idx)[:2]

    def _series_and_key(self, ctx, eid: str, run: str, metric: str, idx: reading.RunIndex):
        key = (eid, run, metric, idx.version(metric))
        series, problems = self._series.get(
            key, lambda: reading.read_series(self._provider, ctx, eid, run, metric, idx, reading.ALL_SAMPLES)
        )
        return series, problems, key

    def _start_read_ahead(self, ctx, eid: str, run: str, idx: reading.RunIndex) -> None:
        """Read a run's metrics and findings into the caches in the background, at most once a minute per run.

        The tab asks for /tags first; by the time the user opens a view its
        data is in memory. Reading a 20,000-step x 500-layer metric from the
        data provider takes about half a second here, which alone would miss
        the 300 ms a view may take.
        """
        now = time.monotonic()
        with self._lock:
            # A live run changes every few seconds: reading all of it again each
            # time would keep a core busy; the views re-read what they show.
            if now - self._read_ahead_seen.get((eid, run), -READ_AHEAD_INTERVAL) < READ_AHEAD_INTERVAL:
                return
            self._read_ahead_seen[(eid, run)] = now
            self._read_ahead.put((ctx, eid, run, idx))
            if self._read_ahead_thread is None or not self._read_ahead_thread.is_alive():
                self._read_ahead_thread = threading.Thread(
                    target=self._read_ahead_loop, name="tb-diag-read-ahead", daemon=True
                )
                self._read_ahead_thread.start()

    @contextlib.contextmanager
    def _foreground(self) -> Iterator[None]:
        """Marks a request's work: the read-ahead yields to it."""
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                if not self._busy:
                    self._idle.notify_all()

    def _wait_idle(self) -> None:
        """Until no request is being answered (at most READ_AHEAD_YIELD_S, so a busy tab cannot starve it)."""
        with self._lock:
            self._idle.wait_for(lambda: self._busy == 0, timeout=READ_AHEAD_YIELD_S)

    def _read_ahead_loop(self) -> None:
        while True:
            try:
                ctx, eid, run, idx = self._read_ahead.get(timeout=30)
            except queue.Empty:
                return  # a new thread starts with the next job
            try:
                self._read_whole_run(ctx, eid, run, idx)
            except Exception:  # the request that needs the data reports the error
                logger.debug("read-ahead of run %r failed", run, exc_info=True)

    def _read_whole_run(self, ctx, eid: str, run: str, idx: reading.RunIndex) -> None:
        """Every metric of a run into the series cache, the overview's first, then its findings;
        yielding to the requests in flight before each."""
        order = [m for m in _READ_AHEAD if m in idx.tags] + sorted(set(idx.tags) - set(_READ_AHEAD))
        for metric in order:
            self._wait_idle()
            self.series(ctx, eid, run, metric, idx)
        self._wait_idle()
        self._findings_of(ctx, eid, run, idx)

    def preloaded_runs(self) -> dict[str, tuple]:
        """Runs the preload has read, each with the data version it read (for tests and benchmarks)."""
        with self._lock:
            return dict(self._preloaded)

    def _preload_pass(self, seen: dict[str, tuple]) -> int:
        """One look at the runs: preload those whose data did not change since the last look
        (`seen`, updated here) and was not preloaded yet, newest first. Returns how many it read;
        a run that fails to read is not tried again until its data changes."""
        ctx, eid = tb_context.RequestContext(), ""
        runs = self._index_for(ctx, eid)
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
        for _, run, version in sorted(settled, key=lambda t: (-t[0], t[1])):
            if self._series.size >= PRELOAD_BYTES:
                logger.info("diagnostics preload stopped: %d MiB of series in memory", self._series.size >> 20)
                break
            try:
                self._read_whole_run(ctx, eid, run, runs[run])
                done += 1
            except Exception:  # this run only: tried again when its data changes; the tab's requests report it
                logger.debug("preloading run %r failed", run, exc_info=True)
            with self._lock:
                self._preloaded[run] = version
                self._read_ahead_seen[(eid, run)] = time.monotonic()
        return done

    def _findings_of(self, ctx, eid: str, run: str, idx: reading.RunIndex) -> dict:
        """The run's findings, cached per data version.

        While a run grows, each poll brings a new version; analysing a big run
        again each time would keep TensorBoard busy, so the previous answer is
        kept for ten times as long as it took to compute (at most a minute):
        a 20k x 500 run that takes 4 s is re-analysed every 40 s, a small one
        at every poll.
        """
        from tb_diag_plugin import findings
        from tb_diag_plugin.findings import model_info

        key = (eid, run, idx.data_version())
        hit = self._findings.peek(key)
        if hit is not None:
            return hit
        with self._lock:
            recent = self._findings_recent.get((eid, run))
        if recent is not None and time.monotonic() < recent[0]:
            return recent[1]

        def compute():
            t0 = time.monotonic()
            # Two reads at a time: a read mostly waits for the data server (another
            # process under --load_fast) or numpy, which both leave the GIL free.
            metrics = sorted(idx.tags)
            with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tb-diag-findings") as pool:
                read = list(pool.map(lambda m: self.series(ctx, eid, run, m, idx)[0], metrics))
            series = dict(zip(metrics, read))
            model, unread = model_info.read_model(
                lambda: reading.read_structure(self._provider, ctx, eid, run) if idx.structure_tag else None)
            found, skipped = findings.analyze(series, model=model)
            skipped = unread + skipped
            answer = {"run": run, "findings": [f.to_dict(run) for f in found], "skipped": skipped}
            done = time.monotonic()
            with self._lock:
                self._findings_recent[(eid, run)] = (done + min(60.0, 10 * (done - t0)), answer)
            return answer

        return self._findings.get(key, compute)

    @_json_route
    @_foreground_route
    def _serve_values(self, request):
        ctx, eid, runs = self._index(request)
        run = self._run(request, runs)
        metric = request.args.get("metric")
        if metric is None:
            raise errors.InvalidArgumentError("missing parameter: metric")
        idx = runs[run]
        if metric not in idx.tags:
            raise errors.NotFoundError(f"run {run[:200]!r} has no metric {metric[:100]!r}")
        points = _arg_int(request, "points", DEFAULT_POINTS, 1, MAX_POINTS)
        start = _arg_int(request, "start", None, 0, 2**63 - 1)
        end = _arg_int(request, "end", None, 0, 2**63 - 1)
        fmt = request.args.get("format", "json")
        if fmt not in ("json", "f32"):
            raise errors.InvalidArgumentError(f"format must be json or f32, got {fmt[:20]!r}")
        wanted = request.args.getlist("layer")
        if len(wanted) > MAX_LAYERS_PER_REQUEST:
            raise errors.InvalidArgumentError("too many layer parameters")

        series, problems, version = self._series_and_key(ctx, eid, run, metric, idx)
        answer_key = (version, request.query_string)
        answer = self._answers.get(
            answer_key,
            lambda: self._values_answer(request, run, metric, idx, series, problems, points, start, end, fmt, wanted),
        )
        return _respond(request, *answer)

    def _values_answer(self, request, run, metric, idx, series, problems, points, start, end, fmt, wanted):
        """(body, content type, content encoding) of a /values answer."""
        cols = np.arange(len(series.layers))
        if wanted:
            pos = {n: j for j, n in enumerate(series.layers)}
            missing = [w for w in wanted if w not in pos]
            if missing:
                raise errors.NotFoundError(f"metric {metric!r} has no layer {missing[0][:200]!r}")
            cols = np.array([pos[w] for w in wanted], dtype=np.int64)
        window = downsample.step_window(series.steps, start, end)
        values, present = series.values[window], series.present[window]  # views, not copies
        if wanted:
            values, present = values[:, cols], present[:, cols]
        b = downsample.bin_steps(series.steps[window], values, present, points)
        header = {
            "run": run,
            "metric": metric,
            "layers": [series.layers[j] for j in cols],
            "layer_types": [series.layer_types[j] for j in cols],
            "num_steps": int(series.steps.size),
            "first_step": int(series.steps[0]) if series.steps.size else None,
            "last_step": int(series.steps[-1]) if series.steps.size else None,
            "binned": b.binned,
            "problems": idx.problems + problems,
        }
        if fmt == "f32":
            return self._f32_body(header, b)
        absent = b.present == 0
        header.update(
            steps=b.step_first.tolist(),
            step_last=b.step_last.tolist(),
            values=_json_matrix(b.mean, absent),
        )
        if b.binned:
            header.update(min=_json_matrix(b.min, absent), max=_json_matrix(b.max, absent),
                          nonfinite=b.nonfinite.astype(np.int64).tolist())
        return json.dumps(_cleanse(header), allow_nan=False).encode("utf-8"), "application/json", None

    def _f32_body(self, header: dict, b: downsample.Binned):
        # Not gzipped: float32 values barely compress (6.0 MB -> 5.4 MB for a
        # 20k x 500 heatmap) and gzip took 0.5 s of the answer. The counts go
        # as the smallest unsigned type that holds them (uint8 for bins of up
        # to 255 steps), and min/max only when rows are bins (else they equal mean).
        arrays = [("step_first", b.step_first.astype(np.float64)), ("step_last", b.step_last.astype(np.float64)),
                  ("mean", b.mean)]
        if b.binned:
            arrays += [("min", b.min), ("max", b.max)]
        arrays += [("nonfinite", _counts(b.nonfinite)), ("present", _counts(b.present))]
        offset = 0
        layout = []
        chunks = []
        for name, arr in arrays:
            dtype = np.dtype(arr.dtype).newbyteorder("<")
            data = np.ascontiguousarray(arr, dtype=dtype).tobytes()
            layout.append({"name": name, "dtype": np.dtype(arr.dtype).name, "shape": list(arr.shape), "offset": offset})
            chunks.append(data)
            offset += len(data)
            pad = -offset % 8  # every array starts 8-byte aligned, so the browser can view it in place
            chunks.append(b"\0" * pad)
            offset += pad
        header["arrays"] = layout
        head = json.dumps(header, allow_nan=False).encode("utf-8")
        head += b" " * (-(len(head) + 4) % 8)
        body = struct.pack("<I", len(head)) + head + b"".join(chunks)
        return body, "application/octet-stream", None

    @_json_route
    @_foreground_route
    def _serve_structure(self, request):
        ctx, eid, runs = self._index(request)
        run = self._run(request, runs)
        if runs[run].structure_tag is None:
            raise errors.NotFoundError(f"run {run[:200]!r} has no model structure")
        try:
            doc = reading.read_structure(self._provider, ctx, eid, run)
        except (ValueError, UnicodeDecodeError) as e:
            raise errors.NotFoundError(f"model structure of run {run[:200]!r} is unreadable: {e}") from None
        if doc is None:
            raise errors.NotFoundError(f"run {run[:200]!r} has no model structure")
        return http_util.Respond(request, {"run": run, "structure": doc}, "application/json")

    @_json_route
    @_foreground_route
    def _serve_findings(self, request):
        ctx, eid, runs = self._index(request)
        run = self._run(request, runs)
        return http_util.Respond(request, self._findings_of(ctx, eid, run, runs[run]), "application/json")


def _newest_wall_time(idx: reading.RunIndex) -> float:
    """When a run last gained a step, from its listing stamps (both loaders put the wall time second)."""
    times = [st[1] for st in idx.stamps.values() if isinstance(st, tuple) and len(st) > 1 and st[1] is not None]
    return max(times, default=0.0)


def _preload_loop(plugin_ref: weakref.ref[DiagnosticsPlugin]) -> None:
    """The preload thread: looks at the runs while the plugin exists (see PRELOAD_POLL_S)."""
    seen: dict[str, tuple] = {}
    failures = 0
    changing = True  # TensorBoard is starting: runs are about to appear
    while failures < PRELOAD_MAX_FAILURES:
        time.sleep(PRELOAD_SETTLE_POLL_S if changing else PRELOAD_POLL_S)
        plugin = plugin_ref()
        if plugin is None:
            return  # the TensorBoard that made it is gone
        before = dict(seen)
        try:
            plugin._preload_pass(seen)
            failures = 0
        except Exception:  # the data provider not up yet, or gone; a request would report it
            failures += 1
            logger.debug("diagnostics preload failed", exc_info=True)
        changing = seen != before or failures > 0
        del plugin


def _counts(a: np.ndarray) -> np.ndarray:
    """Whole-number counts in the smallest of uint8, uint16 or float32 that holds them."""
    top = float(a.max()) if a.size else 0.0
    if top <= 255:
        return a.astype(np.uint8)
    if top <= 65535:
        return a.astype(np.uint16)
    return a.astype(np.float32)


def _respond(request, body: bytes, content_type: str, encoding: Optional[str]):
    return http_util.Respond(request, body, content_type, content_encoding=encoding)


def _cleanse(obj):
    """TensorBoard's JSON convention: NaN and infinities as strings."""
    from tensorboard.backend import json_util

    return json_util.Cleanse(obj)


def _json_matrix(values: np.ndarray, absent: np.ndarray) -> list:
    """Rows as lists; absent cells null, non-finite cells as TensorBoard's JSON strings."""
    out = values.astype(object)
    out[absent] = None
    return out.tolist()


_plotly_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _plotly_gz_cached() -> bytes:
    from plotly.offline import get_plotlyjs

    return gzip.compress(get_plotlyjs().encode("utf-8"), compresslevel=6, mtime=0)


def _plotly_gz() -> bytes:
    """plotly.js from the `plotly` package, gzipped once per process."""
    with _plotly_lock:
        return _plotly_gz_cached()
