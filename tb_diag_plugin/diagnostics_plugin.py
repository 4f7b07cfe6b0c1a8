"""The TensorBoard side: loader (flags) and plugin (routes) of the Diagnostics tab.

TensorBoard imports this module at start-up through the `tensorboard_plugins`
entry point, so it imports neither torch nor plotly. The routes are thin: the
run store (`serving.store`) holds what was read, the background readers
(`serving.background`) fill it, `serving.wire` encodes the answers and
`serving.static` serves the tab's files; every size and interval is a field
of `serving.config.Config`.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin

from tb_diag_plugin import metadata
from tb_diag_plugin.reading import RunIndex
from tb_diag_plugin.serving import static, wire
from tb_diag_plugin.serving.background import Preloader, ReadAhead
from tb_diag_plugin.serving.config import DEFAULT_CACHE_MB, DEFAULT_SAMPLES, Config
from tb_diag_plugin.serving.store import RunStore

__all__ = ["DEFAULT_SAMPLES", "Config", "DiagnosticsLoader", "DiagnosticsPlugin"]


class DiagnosticsLoader(base_plugin.TBLoader):
    """Gives the plugin a full-history retention default and its own flags.

    `config` (tests, benchmarks) sets what no flag does; the flags win over it.
    """

    def __init__(self, config: Optional[Config] = None) -> None:
        self._config = config or Config()

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
                f"much CPU as opening the tab, and up to {Config().preload_budget >> 20} MiB of memory)."
            ),
        )

        parser.add_argument(
            "--diagnostics_cache_mb",
            type=int,
            default=None,
            metavar="MB",
            help=(
                "Memory the Diagnostics plugin may keep for what it has read, in MiB (default "
                f"{DEFAULT_CACHE_MB}); a metric larger than a quarter of it is read from the event files "
                "on demand for each request instead of being kept."
            ),
        )

    def fix_flags(self, flags) -> None:
        cache_mb = getattr(flags, "diagnostics_cache_mb", None)
        if cache_mb is not None and (not isinstance(cache_mb, int) or cache_mb < 1):
            raise base_plugin.FlagsError(f"--diagnostics_cache_mb must be >= 1, got {cache_mb!r}")
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
        flags = getattr(context, "flags", None)
        return DiagnosticsPlugin(context, Config.from_flags(flags, self._config) if flags else self._config)


class DiagnosticsPlugin(base_plugin.TBPlugin):
    """Serves the Diagnostics tab and its data."""

    plugin_name = metadata.PLUGIN_NAME

    def __init__(self, context, config: Optional[Config] = None) -> None:
        self.config = config or Config()
        logdir = getattr(context, "logdir", "") or ""
        self.store = RunStore(context.data_provider, logdir, self.config)
        self.read_ahead = ReadAhead(self.store)
        self.preloader = Preloader(self.store, self.read_ahead)
        self._static = static.StaticFiles()
        if logdir and self.config.preload:
            self.preloader.start()

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop every thread of the plugin (preload, read-ahead, integrity scans) and wait for them."""
        self.store.close()
        self.read_ahead.close(timeout)
        self.preloader.close(timeout)

    # ---------------------------------------------------------- TBPlugin
    def get_plugin_apps(self) -> dict[str, Callable]:
        return {
            "/index.js": self._serve_index,
            "/static/*": self._serve_static,
            "/plotly.js": self._serve_plotly,
            "/runs": self._serve_runs,
            "/tags": self._serve_tags,
            "/values": self._serve_values,
            "/versions": self._serve_versions,
            "/structure": self._serve_structure,
            "/model": self._serve_model,
            "/findings": self._serve_findings,
            "/contract": self._serve_contract,
        }

    def is_active(self) -> bool:
        return False  # the frontend asks the data provider (plugins_listing)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Diagnostics")

    # ------------------------------------------------------------ static
    @wire.json_route
    def _serve_index(self, request):
        return http_util.Respond(request, *self._static.get("index.js"))

    @wire.json_route
    def _serve_static(self, request):
        prefix = "/static/"
        name = request.path[request.path.index(prefix) + len(prefix):] if prefix in request.path else ""
        return http_util.Respond(request, *self._static.get(name))

    @wire.json_route
    def _serve_plotly(self, request):
        return http_util.Respond(
            request, static.plotly_gz(), "application/javascript", content_encoding="gzip", expires=3600
        )

    # -------------------------------------------------------------- data
    def _runs(self, request) -> tuple:
        """(request context, experiment id, runs with diagnostics) of a request."""
        ctx, eid = plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)
        return ctx, eid, self.store.index(ctx, eid)

    def _run(self, request, runs: dict[str, RunIndex]) -> str:
        run = request.args.get("run")
        if run is None:
            raise errors.InvalidArgumentError("missing parameter: run")
        if run not in runs:
            raise errors.NotFoundError(f"no diagnostics for run {run[:200]!r}")
        return run

    def _summary(self, run: str, idx: RunIndex) -> dict:
        return {"run": run, "has_structure": idx.structure_tag is not None,
                "problems": self.store.problems(run, idx)}

    @wire.json_route
    def _serve_runs(self, request):
        _, _, runs = self._runs(request)
        body = [{**self._summary(run, idx), "metrics": sorted(idx.tags),
                 "last_steps": {m: idx.last_step(m) for m in sorted(idx.tags)}} for run, idx in runs.items()]
        return http_util.Respond(request, {"runs": body}, "application/json")

    @wire.json_route
    def _serve_contract(self, request):
        return http_util.Respond(request, metadata.contract_dict(), "application/json")

    @wire.json_route
    def _serve_tags(self, request):
        ctx, eid, runs = self._runs(request)
        run = self._run(request, runs)
        idx = runs[run]
        self.read_ahead.request(ctx, eid, run, idx)  # by the time the user opens a view, its data is in memory
        # Every layer name of every metric (812 kB at 5,000 tensors): encoded once per data version of the
        # run; the summary (its problems change as the integrity checker goes) is added per request.
        metrics = self.store.answers.get(("tags", eid, run, idx.data_version()), lambda: wire.tags_json(idx))
        head = json.dumps(self._summary(run, idx)).encode("utf-8")
        return http_util.Respond(request, head[:-1] + b', "metrics": ' + metrics + b"}", "application/json")

    @wire.json_route
    def _serve_values(self, request):
        with self.store.foreground():
            ctx, eid, runs = self._runs(request)
            run = self._run(request, runs)
            metric = request.args.get("metric")
            if metric is None:
                raise errors.InvalidArgumentError("missing parameter: metric")
            idx = runs[run]
            if metric not in idx.tags:
                raise errors.NotFoundError(f"run {run[:200]!r} has no metric {metric[:100]!r}")
            c = self.config
            points = wire.arg_int(request, "points", c.default_points, 1, c.max_points)
            start = wire.arg_int(request, "start", None, 0, 2**63 - 1)
            end = wire.arg_int(request, "end", None, 0, 2**63 - 1)
            fmt = request.args.get("format", "json")
            if fmt not in ("json", "f32"):
                raise errors.InvalidArgumentError(f"format must be json or f32, got {fmt[:20]!r}")
            wanted = request.args.getlist("layer")
            if len(wanted) > c.max_layers_per_request:
                raise errors.InvalidArgumentError("too many layer parameters")
            max_rows = wire.arg_int(request, "max_rows", None, 1, c.max_layers_per_request)
            expand, reveal = request.args.getlist("expand"), request.args.getlist("reveal")
            if max_rows is None and (expand or reveal):
                raise errors.InvalidArgumentError("expand and reveal need max_rows")
            if len(expand) + len(reveal) > c.max_layers_per_request:
                raise errors.InvalidArgumentError("too many expand or reveal parameters")
            series, problems, version = self.store.series_and_key(ctx, eid, run, metric, idx)
            # A grouped view's binned columns are kept: opening a group regroups them without binning again.
            binned_key = (version, points, start, end, tuple(wanted))
            binned = (lambda make: self.store.binned.get(binned_key, make)) if max_rows is not None else None
            answer = self.store.answers.get(
                (version, request.query_string),
                lambda: wire.values_answer(run, metric, series, idx.problems + problems, points, start, end,
                                           fmt, wanted, max_rows, expand, reveal, wire.version_text(version[3]),
                                           binned, (self.store.group_rows, binned_key)),
            )
            return wire.respond(request, *answer)

    @wire.json_route
    def _serve_versions(self, request):
        # What a live-update poll asks: a view refetches only the metrics whose version changed.
        ctx, eid, runs = self._runs(request)
        run = self._run(request, runs)
        idx = runs[run]
        body = {"run": run, "data_version": wire.version_text(idx.data_version()),
                "metrics": {m: wire.version_text(idx.version(m)) for m in sorted(idx.tags)}}
        return http_util.Respond(request, body, "application/json")

    @wire.json_route
    def _serve_structure(self, request):
        from tb_diag_plugin.reading import read_structure

        with self.store.foreground():
            ctx, eid, runs = self._runs(request)
            run = self._run(request, runs)
            if runs[run].structure_tag is None:
                raise errors.NotFoundError(f"run {run[:200]!r} has no model structure")
            try:
                doc = read_structure(self.store.provider, ctx, eid, run)
            except ValueError as e:  # metadata.ContractError: ignored with this note, never a 500
                raise errors.NotFoundError(f"model structure of run {run[:200]!r} is unreadable and "
                                           f"was ignored: {e}") from None
            if doc is None:
                raise errors.NotFoundError(f"run {run[:200]!r} has no model structure")
            return http_util.Respond(request, {"run": run, "structure": doc}, "application/json")

    @wire.json_route
    def _serve_model(self, request):
        # The model view's rows, grouped to the screen (serving.model_tree): bounded by max_rows, not the model.
        from tb_diag_plugin.serving import model_data, model_tree

        ctx, eid, runs = self._runs(request)
        run = self._run(request, runs)
        idx = runs[run]
        c = self.config
        max_rows = wire.arg_int(request, "max_rows", 40, 1, c.max_layers_per_request)
        wait_ms = wire.arg_int(request, "wait_ms", 0, 0, int(c.findings_max_wait_s * 1000))
        open_unhealthy = request.args.get("open", "true")
        if open_unhealthy not in ("true", "false"):
            raise errors.InvalidArgumentError(f"open must be true or false, got {open_unhealthy[:20]!r}")
        expand, reveal = request.args.getlist("expand"), request.args.getlist("reveal")
        if len(expand) + len(reveal) > c.max_layers_per_request:
            raise errors.InvalidArgumentError("too many expand or reveal parameters")
        # Like /findings?partial=true: the tree never waits for the findings (at most wait_ms).
        found, complete = self.store.findings_if_ready(eid, run, idx, 0)
        if not complete:
            self.read_ahead.request(ctx, eid, run, idx, now=True)
            if wait_ms:
                found, complete = self.store.findings_if_ready(eid, run, idx, wait_ms / 1000)
        query = tuple(sorted((k, v) for k, v in request.args.items(multi=True) if k != "wait_ms"))
        key = ("model", eid, run, idx.data_version(), query)
        hit = self.store.answers.peek(key) if complete else None
        if hit is not None:
            return http_util.Respond(request, hit, "application/json")
        with self.store.foreground():
            modules, doc, note = model_data.modules(self.store, ctx, eid, run, idx)
            grad = model_data.last_values(self.store, ctx, eid, run, idx)
            try:
                body = model_tree.answer(run, modules, (found or {}).get("layers") if complete else None,
                                         model_data.nonfinite(self.store, ctx, eid, run, idx), grad, max_rows,
                                         expand, reveal, open_unhealthy == "true")
            except ValueError as e:
                raise errors.NotFoundError(str(e)) from None
        body.update(has_structure=doc is not None, structure_problem=note,
                    data_version=wire.version_text(idx.data_version()))
        if complete:
            self.store.answers.get(key, lambda: body)
        return http_util.Respond(request, body, "application/json")

    @wire.json_route
    def _serve_findings(self, request):
        partial = wire.arg_bool(request, "partial")
        max_wait_ms = int(self.config.findings_max_wait_s * 1000)
        wait_ms = wire.arg_int(request, "wait_ms", None, 0, max_wait_ms)
        if not partial:
            if wait_ms is not None:
                raise errors.InvalidArgumentError("wait_ms needs partial=true")
            with self.store.foreground():
                ctx, eid, runs = self._runs(request)
                run = self._run(request, runs)
                return http_util.Respond(request, self.store.findings(ctx, eid, run, runs[run]), "application/json")
        # The tab's way: with what is ready, after at most `wait_ms`; the read-ahead computes the rest.
        ctx, eid, runs = self._runs(request)
        run = self._run(request, runs)
        idx = runs[run]
        answer, complete = self.store.findings_if_ready(eid, run, idx, 0)
        if not complete:
            self.read_ahead.request(ctx, eid, run, idx, now=True)
            wait = self.config.findings_wait_s if wait_ms is None else wait_ms / 1000
            answer, complete = self.store.findings_if_ready(eid, run, idx, wait)
        if answer is None:
            answer = {"run": run, "findings": [], "skipped": [], "layers": {}}
        elif complete:
            # The same answer asked again (each view, each poll) is encoded once: 20-30 ms at 5,000 tensors.
            # The entry holds the answer, so no other object can have its id while it is kept.
            key = ("findings", eid, run, idx.data_version(), id(answer))
            kept = self.store.answers.get(key, lambda: (answer, wire.json_bytes({**answer, "complete": True})))
            return http_util.Respond(request, kept[1], "application/json")
        return http_util.Respond(request, {**answer, "complete": complete}, "application/json")

