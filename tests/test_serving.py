"""The plugin's parts: its threads stop with close(), and the tab's findings come without waiting."""

from __future__ import annotations

import threading
import time

import pytest
from _logger_helpers import train_small
from tensorboard import context as tb_context
from torch.utils.tensorboard import SummaryWriter

from tb_diag_plugin import findings
from tb_diag_plugin.diagnostics_plugin import Config
from tb_diag_plugin.reading import LocalReader
from tbserver import serve_with_plugin


def _run(path, steps: int = 30) -> None:
    writer = SummaryWriter(str(path))
    train_small(writer, range(steps))
    writer.close()


def _ours(besides: frozenset = frozenset()) -> list[threading.Thread]:
    """Our live threads, leaving out those in `besides` (another server of the same pytest process)."""
    return [t for t in threading.enumerate() if t.name.startswith("tb-diag") and t.is_alive() and t not in besides]


def _until(cond, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return got


@pytest.mark.parametrize("load_fast", [False, True], ids=["python_loader", "rust_data_server"])
def test_close_stops_every_thread_of_the_plugin(tmp_path, load_fast):
    """Preload, read-ahead and integrity scans all run, and none of them is alive after close()."""
    _run(tmp_path / "r")
    before = frozenset(_ours())  # a session-wide demo server may still be preloading
    config = Config(preload_poll_s=0.1, preload_settle_poll_s=0.1, integrity_inline_bytes=0)
    with serve_with_plugin(str(tmp_path), load_fast=load_fast, config=config) as (srv, plugin):
        srv.wait_for_runs(1, timeout=120)
        srv.plugin("tags?run=r")  # the listing starts an integrity scan
        ctx = tb_context.RequestContext()
        plugin.read_ahead.request(ctx, "", "r", plugin.store.index(ctx, "")["r"], now=True)
        names = {t.name for t in _ours(before)}
        assert {"tb-diag-preload", "tb-diag-read-ahead"} <= names, names
        _until(lambda: plugin.store.integrity.problems(str(tmp_path / "r")) == [] and
               plugin.store.integrity._files, "the integrity scan")
        plugin.close()
        assert _ours(before) == []
        plugin.read_ahead.request(None, "", "r", None)  # closed: starts nothing
        assert _ours(before) == []


def test_partial_findings_answer_at_once_and_complete_later(tmp_path):
    """/findings?partial=true does not wait for the run to be read: while background work is held,
    it answers with nothing and complete=false; later with the same findings as a full analysis."""
    _run(tmp_path / "r")
    config = Config(findings_wait_s=0.0, read_ahead_yield_s=600)
    with serve_with_plugin(str(tmp_path), extra=["--diagnostics_preload", "false"], config=config) as (srv, plugin):
        srv.wait_for_runs(1, timeout=120)
        with plugin.store.foreground():  # as if a view's request were in flight: background work waits
            first = srv.plugin("findings?run=r&partial=true")
            assert (first["complete"], first["findings"]) == (False, [])
            assert len(plugin.store.findings_cache) == 0
        done = _until(lambda: (a := srv.plugin("findings?run=r&partial=true"))["complete"] and a, "the findings")
        assert done == {**srv.plugin("findings?run=r"), "complete": True}
        expected, _ = findings.analyze(LocalReader(str(tmp_path)).series("r"))
        assert [(f["kind"], f["layers"]) for f in done["findings"]] == [(f.kind, list(f.layers)) for f in expected]
        status, body, _ = srv.get("data/plugin/diagnostics/findings?run=r&partial=maybe")
        assert status == 400 and b"partial must be true or false" in body


def test_a_waiting_findings_request_answers_the_moment_they_are_computed(tmp_path):
    """/findings?partial=true&wait_ms=N (the tab's second ask) is held while the findings compute and
    answers with them, complete, in that one request: no polling interval between them and the tab."""
    _run(tmp_path / "r")
    config = Config(read_ahead_yield_s=600, findings_max_wait_s=120)
    with serve_with_plugin(str(tmp_path), extra=["--diagnostics_preload", "false"], config=config) as (srv, plugin):
        srv.wait_for_runs(1, timeout=120)
        got: list = []
        with plugin.store.foreground():  # background work waits until this block ends
            ask = "findings?run=r&partial=true&wait_ms=120000"
            asking = threading.Thread(target=lambda: got.append(srv.plugin(ask)))
            asking.start()
            _until(lambda: ("", "r") in plugin.read_ahead._queued, "the request to start the read-ahead")
            assert not got, "answered before the findings could be computed"
        asking.join(150)
        assert got and got[0]["complete"] is True
        assert got[0] == {**srv.plugin("findings?run=r"), "complete": True}
        for query, why in (("wait_ms=10", b"wait_ms needs partial=true"),
                           ("partial=true&wait_ms=120001", b"wait_ms must be between 0 and 120000"),
                           ("partial=true&wait_ms=soon", b"wait_ms must be an integer")):
            status, body, _ = srv.get("data/plugin/diagnostics/findings?run=r&" + query)
            assert status == 400 and why in body, (query, body)
