"""A real TensorBoard server in-process, for tests and benchmarks (no mocks)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Iterator, Optional, Sequence, TypeVar

from tensorboard import program
from tensorboard.plugins import base_plugin
from tensorboard.plugins.core import core_plugin
from tensorboard.plugins.scalar import scalars_plugin

from tb_diag_plugin.diagnostics_plugin import Config, DiagnosticsLoader

T = TypeVar("T")


class Server:
    """A client of a running TensorBoard at `url` (this module's `serve`, or a `tensorboard` command a
    benchmark started); a request waits at most `timeout` seconds unless told otherwise."""

    def __init__(self, url: str, timeout: float = 60) -> None:
        self.url = url
        self.timeout = timeout

    def get(
        self, path: str, headers: Optional[dict] = None, timeout: Optional[float] = None
    ) -> tuple[int, bytes, dict]:
        """GET `path` (relative to the server root); returns (status, body, headers)."""
        req = urllib.request.Request(self.url + path.lstrip("/"), headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout if timeout is None else timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def json(self, path: str):
        """The JSON answer to GET `path`; RuntimeError naming the path, status and body unless it is 200."""
        status, body, _ = self.get(path)
        if status != 200:
            raise RuntimeError(f"{path}: {status} {body[:500]!r}")
        return json.loads(body)

    def plugin(self, route: str):
        return self.json("data/plugin/diagnostics/" + route.lstrip("/"))

    def wait_for_runs(self, n: int, timeout: Optional[float] = None) -> list[dict]:
        """Poll until the plugin lists `n` runs (the Rust data server loads asynchronously); `timeout`
        None waits as long as it takes (pytest's timeout ends a hang)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        runs: list[dict] = []
        while deadline is None or time.monotonic() < deadline:
            runs = self.plugin("runs")["runs"]
            if len(runs) >= n:
                return runs
            time.sleep(0.3)
        raise TimeoutError(f"only {len(runs)} of {n} runs after {timeout} s")


def until(condition: Callable[[], T], poll_s: float = 0.1) -> T:
    """Poll `condition` until it returns something true, and return that. No deadline: what a test
    waits for either happens or pytest's timeout ends the test (a wall-clock bound of its own would
    fail on a busy machine for no fault of the code)."""
    while not (got := condition()):
        time.sleep(poll_s)
    return got


@contextlib.contextmanager
def serve_with_plugin(
    logdir: str, load_fast: bool = False, extra: Sequence[str] = (), config: Optional[Config] = None
) -> Iterator[tuple]:
    """`serve` (core, scalars and Diagnostics plugins), yielding (server, the DiagnosticsPlugin object);
    `config` sets what no flag does. The plugin is closed (every thread of it stopped) on exit."""
    made: list = []

    class Capturing(DiagnosticsLoader):
        def load(self, context):
            made.append(super().load(context))
            return made[-1]

    plugins = [core_plugin.CorePluginLoader(), base_plugin.BasicLoader(scalars_plugin.ScalarsPlugin),
               Capturing(config)]
    with serve(logdir, load_fast=load_fast, extra=extra, plugins=plugins) as srv:
        try:
            yield srv, made[0]
        finally:
            made[0].close()


@contextlib.contextmanager
def serve(
    logdir: str, load_fast: bool = False, extra: Sequence[str] = (), plugins: Optional[Sequence] = None
) -> Iterator[Server]:
    """Start TensorBoard on a free loopback port; stop it on exit.

    `plugins` defaults to core, scalars and Diagnostics; pass
    `tensorboard.default.get_plugins()` for everything `tensorboard` loads.
    """
    tb = program.TensorBoard(
        plugins=list(plugins)
        if plugins is not None
        else [
            core_plugin.CorePluginLoader(),
            base_plugin.BasicLoader(scalars_plugin.ScalarsPlugin),
            DiagnosticsLoader(),
        ]
    )
    tb.configure(
        argv=[
            "",
            "--logdir", str(logdir),
            "--port", "0",
            "--host", "127.0.0.1",
            "--load_fast", "true" if load_fast else "false",
            "--reload_interval", "1",
            *extra,
        ]
    )
    server = tb._make_server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(server.get_url())
    finally:
        server.shutdown()
        server.server_close()
