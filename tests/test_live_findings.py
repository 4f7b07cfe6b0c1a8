"""Findings in the training process (issue 23): `diag.findings()`, alerts, `stop_on`, on real runs.

Each run's in-process findings are compared with `tb-diag report --json` on the event files it wrote,
read back through TensorBoard: the same rules on what the file holds, computed independently of the
logger's memory.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _live_loop import diverging_loop
from _logger_helpers import read
from torch import nn

from tb_diag_logger import Diagnostics, DiagnosticsWarning
from tb_diag_logger.live import LiveFindings
from tb_diag_plugin import metadata, report
from tb_diag_plugin.findings import Finding

HERE = os.path.dirname(__file__)


def _report(logdir) -> list[dict]:
    """`tb-diag report --json LOGDIR`'s findings, without the run name."""
    out = io.StringIO()
    report.run(str(logdir), True, None, out)
    return [{k: v for k, v in f.items() if k != "run"} for f in json.loads(out.getvalue())]


def _live(found: list[Finding]) -> list[dict]:
    return [{k: v for k, v in f.to_dict("").items() if k != "run"} for f in found]

def _stopped_at_an_error(series, expected: list[dict]) -> int:
    """The one step recorded as stopped, checked against the report: an error had appeared by then, and
    it is no later than the first NaN/Inf (evaluated at once). Which logged step between the two depends
    on the evaluations' time budget, so on the machine's load: that is all a test may pin."""
    stopped = series[metadata.STOPPED].steps.tolist()
    assert len(stopped) == 1, stopped
    errors = [f for f in expected if f["severity"] == "error"]
    assert errors and min(f["first_step"] for f in errors) <= stopped[0], (stopped, errors)
    nonfinite = [f["first_step"] for f in expected if f["kind"] == "nonfinite"]
    assert not nonfinite or stopped[0] <= nonfinite[0]
    return stopped[0]



class _Alerts(logging.Handler):
    """The `tb_diag` logger's records, each with the training step it was emitted at."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.step = -1
        self.lines: list[tuple[int, int, str]] = []  # (step, level, message)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((self.step, record.levelno, record.getMessage()))


@pytest.fixture
def alerts():
    handler = _Alerts()
    log = logging.getLogger("tb_diag")
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)


def _ramp(logdir, alerts: _Alerts, steps: int = 150, blow_up: bool = True, **kw) -> tuple[Diagnostics, int]:
    """`diverging_loop` (a corrupted sample at step 55 when `blow_up`), each alert recorded with its step.

    Returns the closed `Diagnostics` and the last step run."""
    def at(step: int) -> None:
        alerts.step = step

    diag, last = diverging_loop(logdir, steps, blow_up, on_step=at, **kw)
    alerts.step = -1
    diag.close()
    return diag, last


def test_a_diverging_loop_alerts_each_error_once_the_first_at_the_step_its_finding_begins(tmp_path, alerts):
    diag, last = _ramp(tmp_path, alerts)
    assert last == 149 and not diag.should_stop  # stop_on is off by default: the run goes on
    expected = _report(tmp_path)
    assert _live(diag.findings()) == expected
    errors = [f for f in expected if f["severity"] == "error"]
    nonfinite = next(f for f in errors if f["kind"] == "nonfinite")
    kinds = [msg.split(": ")[1].split(" from ")[0] for _, _, msg in alerts.lines]
    assert sorted(kinds) == sorted(f["kind"] for f in errors)  # each error once, nothing below it
    step, level, line = next(a for a in alerts.lines if " nonfinite from " in a[2])
    assert step == nonfinite["first_step"] and level == logging.ERROR
    assert min(s for s, _, _ in alerts.lines) == step  # the first alert comes at that step
    assert f"step {step}" in line and nonfinite["suggestion"] in line and f"tensorboard --logdir {tmp_path}" in line
    assert "stopped" not in read(tmp_path)


def test_stop_on_error_stops_the_loop_at_that_step_and_the_event_file_records_it(tmp_path, alerts):
    diag, last = _ramp(tmp_path, alerts, stop_on="error")
    expected = _report(tmp_path)
    nonfinite = next(f for f in expected if f["kind"] == "nonfinite")
    assert diag.should_stop and last == nonfinite["first_step"] == alerts.lines[0][0]
    series = read(tmp_path)
    assert series["loss"].steps[-1] == last  # nothing was logged after the stop
    stopped = series[metadata.STOPPED]
    assert stopped.steps.tolist() == [last] and stopped.values.tolist() == [[metadata.SEVERITY_RANK["error"]]]
    assert _live(diag.findings()) == expected


def test_a_healthy_loop_alerts_nothing_and_its_findings_equal_the_report(tmp_path, alerts):
    diag, last = _ramp(tmp_path, alerts, steps=60, blow_up=False, stop_on="warning", alert="warning")
    assert last == 59 and not diag.should_stop and alerts.lines == []
    assert _live(diag.findings()) == _report(tmp_path)


def test_alert_none_is_silent_and_alert_warning_announces_warnings(tmp_path, alerts):
    _ramp(tmp_path / "quiet", alerts, alert=None)
    assert alerts.lines == []
    diag, _ = _ramp(tmp_path / "loud", alerts, alert="warning")
    announced = {f["kind"] for f in _report(tmp_path / "loud") if f["severity"] in ("error", "warning")}
    said = [(msg.split(": ")[1].split(" from ")[0], level) for _, level, msg in alerts.lines]
    # Every warning or error at the end was announced; one seen on the way (update_ratio here, later
    # explained by the divergence) was announced when it was one. Each once per severity.
    assert announced <= {kind for kind, _ in said} and len(said) == len(set(said))


def test_with_neither_alert_nor_stop_on_nothing_is_evaluated_until_findings_are_asked_for(tmp_path, alerts):
    diag, last = _ramp(tmp_path, alerts, alert=None)  # the loop that goes NaN: even that waits
    assert last == 149 and alerts.lines == [] and diag._live.evaluations == 0
    assert _live(diag.findings()) == _report(tmp_path) and diag._live.evaluations == 1


def test_a_finding_is_announced_again_only_when_it_gets_worse(alerts):
    live = LiveFindings("warning", None, "runs/x", lambda where, e: None)

    def finding(severity: str, last: int) -> Finding:
        return Finding("dead_relu", severity, ["1"], 10, last, "Dead units.", "Lower the learning rate.")

    for found in ([finding("warning", 10)], [finding("warning", 20)], [finding("error", 30)], [finding("error", 40)],
                  [finding("warning", 50)]):
        live._alert(found)
    assert [level for _, level, _ in alerts.lines] == [logging.WARNING, logging.ERROR]


def test_a_failing_rules_engine_costs_one_warning_and_never_the_training(tmp_path, alerts, monkeypatch):
    from tb_diag_plugin import findings as engine

    def broken(*args, **kwargs):
        raise RuntimeError("rules engine broken")

    monkeypatch.setattr(engine, "analyze", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diag, last = _ramp(tmp_path, alerts, stop_on="error")
    ours = [w for w in caught if issubclass(w.category, DiagnosticsWarning)]
    assert last == 149 and len(ours) == 1 and "rules engine broken" in str(ours[0].message)
    assert diag.findings() == [] and not diag.should_stop


@pytest.mark.parametrize("option", ["alert", "stop_on"])
def test_bad_alert_and_stop_on_name_the_option(tmp_path, option):
    with pytest.raises(ValueError, match=option):
        Diagnostics(nn.Linear(2, 2), logdir=str(tmp_path), **{option: "fatal"})


def test_retention_keeps_the_latest_step_and_a_bounded_history():
    live = LiveFindings(None, None, None, lambda where, e: None, limit=64)
    for step in range(1000):
        live.observe_vectors(step, [("loss", ["total"], (), np.array([float(step)]))])
    s = live.series()["loss"]
    assert s.steps.size <= 64 and s.steps[0] == 0 and s.steps[-1] == 999
    assert np.all(np.diff(s.steps) > 0) and np.array_equal(s.values[:, 0], s.steps.astype(np.float32))


# ------------------------------------------------------------------ HF Trainer
def _hf(tmp_path, lr: float, ramp: float, **cb):
    transformers = pytest.importorskip("transformers")
    from tb_diag_logger.integrations.transformers import DiagnosticsCallback

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=0))
    data = [{"input_ids": torch.randint(0, 96, (16,)), "labels": torch.randint(0, 96, (16,))} for _ in range(48)]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: ramp**s)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, logging_steps=1, max_steps=30,
        report_to=["tensorboard"], save_strategy="no", use_cpu=True, disable_tqdm=True, max_grad_norm=0.0)
    callback = DiagnosticsCallback(every=2, **cb)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback],
                                   optimizers=(opt, sched))
    trainer.train()
    return trainer, callback


def test_hf_trainer_stops_at_the_first_error_and_its_findings_equal_the_report(tmp_path, alerts):
    trainer, callback = _hf(tmp_path, lr=0.1, ramp=1.5, stop_on="error")
    expected = _report(tmp_path / "out")
    first_error = min(f["first_step"] for f in expected if f["severity"] == "error")
    assert _live(callback.findings()) == expected
    stopped = next(s for s in read_runs(tmp_path / "out") if metadata.STOPPED in s)[metadata.STOPPED]
    assert trainer.state.global_step == stopped.steps[0] < 30  # stopped at the logged step it decided on
    assert first_error <= trainer.state.global_step
    assert len(alerts.lines) == len({f["kind"] for f in expected if f["severity"] == "error"})


def test_hf_trainer_healthy_run_findings_equal_the_report(tmp_path, alerts):
    trainer, callback = _hf(tmp_path, lr=0.05, ramp=1.0, stop_on="error")
    assert trainer.state.global_step == 30 and alerts.lines == []
    assert _live(callback.findings()) == _report(tmp_path / "out")


def read_runs(root) -> list[dict]:
    return [read(d) for d, _, files in os.walk(root) if any("tfevents" in f for f in files)]


# ------------------------------------------------------------------- Lightning
def _lightning(tmp_path, lr: float, ramp: float, **cb):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import TensorBoardLogger

    from tb_diag_logger.integrations.lightning import DiagnosticsCallback

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=lr)
            return {"optimizer": opt, "lr_scheduler": {
                "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: ramp**s), "interval": "step"}}

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
    callback = DiagnosticsCallback(every=5, **cb)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=120, logger=TensorBoardLogger(str(tmp_path), name="run", version=0),
        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=64))
    return trainer, callback


@pytest.mark.parametrize("lr,ramp", [(1e-3, 1.15), (0.05, 1.0)])
def test_lightning_stop_on_error_stops_there_and_findings_equal_the_report(tmp_path, alerts, lr, ramp):
    trainer, callback = _lightning(tmp_path, lr=lr, ramp=ramp, stop_on="error")
    expected = _report(tmp_path)
    assert _live(callback.findings()) == expected
    series = read(tmp_path / "run" / "version_0")
    if lr == 1e-3:  # diverges: stopped at a logged step with an error, the first NaN at the latest
        stopped = _stopped_at_an_error(series, expected)
        assert trainer.global_step == stopped + 1  # Lightning counts the step it finished
    else:  # a constant, moderate learning rate: healthy
        assert metadata.STOPPED not in series and trainer.global_step == 120
        assert not [f for f in expected if f["severity"] == "error"] and alerts.lines == []


# ---------------------------------------------------------- torch.distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("stop_on", ["error", ""])
def test_two_gloo_ranks_stop_at_the_same_step(tmp_path, stop_on):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_live_worker.py"), str(r), "2", str(port),
                               str(tmp_path), stop_on], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    expected = _report(tmp_path / "run")
    if stop_on:
        nonfinite = next(f for f in expected if f["kind"] == "nonfinite")
        assert ranks == [{"last": nonfinite["first_step"], "stopped": True}] * 2
        assert read(tmp_path / "run")[metadata.STOPPED].steps.tolist() == [nonfinite["first_step"]]
    else:
        assert ranks == [{"last": 119, "stopped": False}] * 2


# ------------------------------------------------------------- the tab shows it
def test_the_tab_shows_when_and_why_a_run_was_stopped_above_its_findings(tmp_path, alerts, browser):
    from tbserver import serve

    diag, last = _ramp(tmp_path / "diverged", alerts, stop_on="error")
    _ramp(tmp_path / "healthy", alerts, steps=60, blow_up=False)
    reasons = [f["kind"] for f in _report(tmp_path / "diverged") if f["severity"] == "error"
               and f["first_step"] <= last]
    with serve(str(tmp_path)) as server:
        server.wait_for_runs(2)
        stopped = server.plugin("findings?run=diverged")["stopped"]
        assert stopped == {"step": last, "stop_on": "error", "kinds": reasons}
        assert "stopped" not in server.plugin("findings?run=healthy")

        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.goto(server.url + "#diagnostics")
        frame = None
        for _ in range(600):  # the iframe exists once the tab is selected
            frame = next((f for f in page.frames if "plugin_entry.html?name=diagnostics" in f.url), None)
            if frame is not None:
                break
            page.wait_for_timeout(100)
        assert frame is not None
        note = frame.wait_for_selector(".findings .run-stopped", timeout=60_000)
        assert note.get_attribute("data-run") == "diverged" and note.get_attribute("data-step") == str(last)
        text = note.inner_text()
        assert f"step {last}" in text and all(k in text for k in reasons)
        assert len(frame.query_selector_all(".findings .run-stopped")) == 1  # the healthy run has none
        # Above the findings: before the first finding in the document.
        assert frame.evaluate("""() => {
            const note = document.querySelector('.findings .run-stopped');
            const first = document.querySelector('.findings .finding');
            return !!first && !!(note.compareDocumentPosition(first) & Node.DOCUMENT_POSITION_FOLLOWING);
        }""")
        page.context.close()


# ------------------------------------------------------------ the README's snippets
def _snippet(marker: str) -> str:
    """The ```python block after `<!-- readme-test: marker -->` in README.md, as written."""
    import re
    from pathlib import Path

    text = (Path(HERE).parent / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"<!-- readme-test: {re.escape(marker)} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no snippet marked {marker!r}"
    return m.group(1)


def test_readme_alerts_and_stopping_loop_snippet(tmp_path, monkeypatch, alerts, capsys):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(100)]
    batches[30][0][0, 0] = float("inf")  # one corrupt sample: NaN weights from step 30's update on
    exec(_snippet("live-loop"), {"model": model, "opt": opt, "loader": batches})
    expected = _report(tmp_path / "runs")
    nonfinite = next(f for f in expected if f["kind"] == "nonfinite")
    assert nonfinite["first_step"] == 40  # the first logged step (every=20) after the corrupt batch
    assert read(tmp_path / "runs" / "exp1")["loss"].steps.tolist() == [0, 20, 40]  # stopped there
    assert [s for s, _, m in alerts.lines if " nonfinite from step 40" in m] == [-1]  # one line (step unset here)
    assert "error nonfinite 40" in capsys.readouterr().out


def test_readme_alerts_and_stopping_hf_snippet(tmp_path, monkeypatch, alerts, capsys):
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        model.transformer.wte.weight[5] = float("nan")  # a broken checkpoint: token 5's embedding
    ids = torch.randint(0, 96, (160, 8))
    ids[:, 0] = 5
    exec(_snippet("live-hf"), {"model": model, "train_ds": [{"input_ids": r, "labels": r} for r in ids]})
    expected = _report(tmp_path / "out")
    assert [f["kind"] for f in expected if f["severity"] == "error"] == ["nonfinite"]
    assert read_runs(tmp_path / "out")[0][metadata.STOPPED].steps.tolist() == [1]  # stopped at the first step
    assert "('nonfinite', 1)" in capsys.readouterr().out and len(alerts.lines) == 1


def test_readme_alerts_and_stopping_lightning_snippet(tmp_path, monkeypatch, alerts, capsys):
    pl = pytest.importorskip("lightning.pytorch")
    monkeypatch.chdir(tmp_path)

    class Module(pl.LightningModule):  # the learning rate ramps up 15 % a step: it diverges
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1e-3)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.15**s)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
    exec(_snippet("live-lightning"), {"module": Module(), "loader": torch.utils.data.DataLoader(data, batch_size=64)})
    expected = _report(tmp_path / "runs")
    stopped = _stopped_at_an_error(read(tmp_path / "runs" / "live" / "version_0"), expected)
    last = capsys.readouterr().out.strip().splitlines()[-1]  # after Lightning's own output
    errors = {f["kind"] for f in expected if f["severity"] == "error"}
    assert last.startswith(f"{stopped + 1} [") and any(f"'{k}'" in last for k in errors)  # it counts the step done


def test_logged_steps_over_the_time_budget_wait_but_a_nan_is_evaluated_at_once():
    live = LiveFindings("error", "error", None, lambda where, e: None, share=0.0)
    for step in range(0, 100, 10):
        live.observe_vectors(step, [("loss", ["total"], (), np.array([1.0 / (step + 1)]))])
        live.evaluate(step)
    first = live.evaluations
    assert first == 1  # only the first: nothing spent yet
    live.observe_vectors(100, [("loss", ["total"], (), np.array([np.nan]))])
    live.evaluate(100)
    assert live.evaluations == first + 1 and live.wants_stop
    assert [f.kind for f in live.findings()] == ["nonfinite"]


def test_evaluations_never_take_more_than_their_share_of_the_wall_time():
    """Given times (no real clock): each evaluation costs 1 s, a logged step comes every 1 s. The budget
    counts the evaluation about to run as long as the last one, so past the first evaluation (taken when
    nothing is spent) the time spent never exceeds the share of the time since the first values."""
    now = [0.0]
    live = LiveFindings("error", None, None, lambda where, e: None, share=0.1, clock=lambda: now[0])
    series = live.series

    def costly_series():
        now[0] += 1.0  # the rules take one second of the clock
        return series()

    live.series = costly_series
    for step in range(200):
        live.observe_vectors(step, [("loss", ["total"], (), np.array([1.0 / (step + 1)]))])
        live.evaluate(step)
        elapsed = now[0]
        assert live.eval_s <= 1.0 + 1e-9 or live.eval_s <= live.share * elapsed + 1e-9, (step, live.eval_s, elapsed)
        now[0] += 1.0  # the next logged step a second later
    # About the share's worth of evaluations: 10 % of ~(200 + evaluations) seconds at 1 s each.
    assert 20 <= live.evaluations <= 23, live.evaluations
