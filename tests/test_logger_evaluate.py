"""`Diagnostics.evaluate()`: validation loss and metrics, through real event files and the plugin's routes."""

from __future__ import annotations

import io
import json
import math
import warnings

import pytest
import torch
from _logger_helpers import at, close, read, recorded
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics, DiagnosticsWarning
from tb_diag_plugin.export import export
from tbserver import serve_with_plugin

EVALS = {  # step -> (validation loss, metrics); steps are not all logged steps (every=4)
    0: (2.5, {"accuracy": 0.1, "f1": 0.05}),
    3: (1.75, {"accuracy": 0.5, "f1": 0.4}),
    7: (float("nan"), {"accuracy": 0.625, "f1": float("inf")}),
    8: (1.25, {"accuracy": 0.75, "f1": 0.7}),
}


def _train(logdir, steps: int = 10) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(str(logdir))
    with Diagnostics(model, writer, every=4, optimizer=opt) as diag:
        for step in range(steps):
            loss = model(torch.randn(8, 3)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss)
            opt.step()
            if step in EVALS:
                val, metrics = EVALS[step]
                # a tensor loss and a tensor metric, as users pass them
                diag.evaluate(step, loss=torch.tensor(val), metrics={**metrics, "f1": torch.tensor(metrics["f1"])})
    writer.close()


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    _train(root / "run")
    return root


def test_val_loss_and_metrics_round_trip_through_event_files(logdir):
    series = read(logdir, "run")
    assert series["val_loss"].steps.tolist() == sorted(EVALS)
    assert sorted(series["val_metric"].layers) == ["accuracy", "f1"]
    for step, (val, metrics) in EVALS.items():
        assert close(at(series, "val_loss", "total", step), float(torch.tensor(val)))
        for name, want in metrics.items():
            assert close(at(series, "val_metric", name, step), float(torch.tensor(want, dtype=torch.float32)))
    # Training loss stays on logged steps only.
    assert series["loss"].steps.tolist() == [0, 4, 8]
    assert recorded(series, "val_loss", "total", 3) and not recorded(series, "loss", "total", 3)


def test_val_loss_is_served_by_the_plugin_routes(logdir):
    with serve_with_plugin(str(logdir)) as (srv, _):
        runs = {r["run"]: r for r in srv.wait_for_runs(1)}
        assert {"val_loss", "val_metric"} <= set(runs["run"]["metrics"])
        body = srv.plugin("values?run=run&metric=val_loss")
        assert body["layers"] == ["total"] and body["steps"] == sorted(EVALS)
        got = [row[0] for row in body["values"]]
        assert got[0] == 2.5 and got[1] == 1.75 and got[2] == "NaN" and got[3] == 1.25
        body = srv.plugin("values?run=run&metric=val_metric&layer=f1")
        assert body["values"][2] == ["Infinity"]


def test_export_has_the_validation_rows(logdir):
    out = io.StringIO()
    assert export(str(logdir), None, "jsonl", out) == 0
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    acc = [(r["step"], r["value"]) for r in rows if r["metric"] == "val_metric" and r["layer"] == "accuracy"]
    assert acc == [(s, float(torch.tensor(m["accuracy"]))) for s, (_, m) in EVALS.items()]


def test_bad_arguments_raise_naming_the_argument(tmp_path):
    model = nn.Linear(2, 1)
    with Diagnostics(model, logdir=str(tmp_path)) as diag:
        with pytest.raises(TypeError, match="step"):
            diag.evaluate(1.5, loss=1.0)
        with pytest.raises(ValueError, match="step"):
            diag.evaluate(-1, loss=1.0)
        with pytest.raises(TypeError, match="loss"):
            diag.evaluate(0, loss="low")
        with pytest.raises(ValueError, match="loss"):
            diag.evaluate(0, loss=torch.ones(3))
        with pytest.raises(TypeError, match="metrics"):
            diag.evaluate(0, metrics=[("acc", 1.0)])
        with pytest.raises(TypeError, match="metrics"):
            diag.evaluate(0, metrics={"acc": "high"})
        with pytest.raises(TypeError, match="metrics"):
            diag.evaluate(0, metrics={3: 1.0})
        with pytest.raises(ValueError, match="loss= or metrics="):
            diag.evaluate(0)
        diag.evaluate(5, loss=1.0)
        diag.evaluate(5, metrics={"acc": 0.5})  # the same step again is not going backwards
        with pytest.raises(ValueError, match="decrease"):
            diag.evaluate(4, loss=1.0)
        diag.step(2)  # step() and evaluate() keep separate orders
    with pytest.raises(RuntimeError, match="close"):
        diag.evaluate(6, loss=1.0)


def test_a_failing_write_is_one_warning_not_a_crash(tmp_path):
    model = nn.Linear(2, 1)
    writer = SummaryWriter(str(tmp_path))
    diag = Diagnostics(model, writer)
    diag.evaluate(0, loss=1.0)

    def broken(*a, **k):
        raise OSError("disk full")

    writer._get_file_writer().add_summary = broken
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diag.evaluate(1, loss=0.5)
        diag.evaluate(2, loss=0.25)
    assert sum(issubclass(w.category, DiagnosticsWarning) for w in caught) == 1
    writer._get_file_writer().__dict__.pop("add_summary")
    diag.close()
    writer.close()
    assert math.isclose(at(read(tmp_path), "val_loss", "total", 0), 1.0)
