"""`tb-diag export`: a round trip from what the logger recorded to CSV / JSON Lines rows."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from _logger_helpers import close
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics
from tb_diag_plugin.export import export
from tb_diag_plugin.reading import LocalReader

ODD = 'odd, "quoted"\nname é'
LOSSES = {  # (run, step) -> losses logged; non-finite values included
    ("a", 0): {"ce": 1.25, ODD: float("nan")},
    ("a", 2): {"ce": float("inf"), ODD: -float("inf")},
    ("b", 0): {"ce": 0.1, ODD: 1e-30},
}


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    for run in ("a", "b"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        writer = SummaryWriter(str(root / run))
        with Diagnostics(model, writer, every=2, optimizer=opt) as diag:
            for step in range(3 if run == "a" else 1):
                opt.zero_grad()
                loss = model(torch.randn(4, 2)).pow(2).mean()
                loss.backward()
                diag.step(step, loss=loss, losses=LOSSES.get((run, step), {}))
                opt.step()
                writer.add_scalar("user/loss", loss.item(), step)  # the user's own scalars stay out
        writer.close()
    return str(root)


def _expected(logdir, run=None) -> list[tuple]:
    reader = LocalReader(logdir)
    rows = []
    for r in reader.runs():
        if run is not None and r != run:
            continue
        for metric, s in sorted(reader.series(r).items()):
            for i, step in enumerate(s.steps.tolist()):
                for j, layer in enumerate(s.layers):
                    if s.present[i, j]:
                        rows.append((r, metric, layer, step, float(s.values[i, j])))
    return rows


def _same(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g[:4] == w[:4]
        a, b = g[4], w[4]
        assert (math.isnan(a) and math.isnan(b)) or a == b, (g, w)  # exact: float32 values round-trip


def _csv(logdir, run=None) -> tuple[int, str]:
    out = io.StringIO()
    return export(logdir, run, "csv", out), out.getvalue()


def test_csv_round_trip_equals_what_was_logged(logdir):
    status, text = _csv(logdir)
    assert status == 0
    reader = csv.reader(io.StringIO(text, newline=""))
    assert next(reader) == ["run", "metric", "layer", "step", "value"]
    got = [(r, m, layer, int(step), float(v)) for r, m, layer, step, v in reader]
    _same(got, _expected(logdir))
    by_key = {(r, m, layer, step): v for r, m, layer, step, v in got}
    # The logged values themselves, including non-finite ones and a name that needs quoting.
    for (run, step), losses in LOSSES.items():
        for name, value in losses.items():
            assert close(by_key[(run, "loss", name, step)], value, rel=1e-6, abs_=0), (run, name, step)
    assert by_key[("a", "grad_norm_total", "", 2)] > 0
    assert {m for _, m, *_ in got} >= {"grad_norm", "weight_norm", "update_ratio", "dead_fraction", "loss"}
    assert not any(m.startswith("user") for _, m, *_ in got)


def test_jsonl_round_trip_and_run_filter(logdir):
    out = io.StringIO()
    assert export(logdir, "b", "jsonl", out) == 0
    lines = out.getvalue().splitlines()
    objects = [json.loads(line) for line in lines]
    assert all(list(o) == ["run", "metric", "layer", "step", "value"] for o in objects)
    _same([tuple(o.values()) for o in objects], _expected(logdir, "b"))
    assert {o["run"] for o in objects} == {"b"}


def test_pandas_reads_the_csv_without_options(logdir):
    pd = pytest.importorskip("pandas")
    _, text = _csv(logdir)
    df = pd.read_csv(io.StringIO(text))
    assert list(df.columns) == ["run", "metric", "layer", "step", "value"]
    assert df["value"].dtype == "float64" and df["step"].dtype == "int64"
    loss = df[(df.metric == "loss") & (df.run == "a")].set_index(["layer", "step"])["value"]
    assert math.isnan(loss[(ODD, 0)]) and loss[("ce", 2)] == math.inf and loss[(ODD, 2)] == -math.inf
    jl = io.StringIO()
    export(logdir, None, "jsonl", jl)
    assert len(pd.read_json(io.StringIO(jl.getvalue()), lines=True)) == len(df)


def test_bad_requests_exit_2_with_a_message(logdir, tmp_path, capsys):
    assert export(logdir, "no-such-run", "csv", io.StringIO()) == 2
    assert "no-such-run" in capsys.readouterr().err
    assert export(str(tmp_path / "missing"), None, "csv", io.StringIO()) == 2
    assert export(logdir, None, "xml", io.StringIO()) == 2
    status, text = _csv(str(tmp_path))  # a directory without diagnostics: only the header
    assert status == 0 and text == "run,metric,layer,step,value\n"


def test_the_command_line_streams_into_a_closed_pipe_quietly(logdir):
    cmd = [sys.executable, "-m", "tb_diag_plugin", "export", logdir]  # `tb-diag export LOGDIR`
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert full.returncode == 0 and len(list(csv.reader(io.StringIO(full.stdout)))) == len(_expected(logdir)) + 1
    shell = f"{' '.join(map(_quote, cmd))} | head -n 2"
    head = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, timeout=120)
    assert head.stdout.count("\n") == 2
    assert "Traceback" not in head.stderr and "BrokenPipe" not in head.stderr


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'" if os.sep in arg or " " in arg or ";" in arg else arg
