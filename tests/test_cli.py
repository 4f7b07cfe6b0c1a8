"""`tb-diag report --fail-on` and `tb-diag export --run/--format` through the command, on real event files.

The runs are written with the contract's own writer (`tb_diag_plugin.summary`) and values chosen here, so what the
command prints is compared with those values, not with another reading by our code.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tb_diag_plugin import cli
from tb_diag_plugin.summary import EventWriter

STEPS = 40
LAYERS = ["a.weight", "a.bias", "b.weight", "b.bias"]
ORDER = ("info", "warning", "error")  # severities, mildest first


def _write(path, loss: np.ndarray, grads: np.ndarray) -> None:
    """One run: the total loss and four parameters' gradient norms at each step, as the logger writes them."""
    sink = EventWriter(str(path))
    for step in range(len(loss)):
        sink.write_vectors(step, [
            ("loss", ["total"], (), np.array([loss[step]], np.float32)),
            ("grad_norm", LAYERS, (), grads[step].astype(np.float32)),
        ])
    sink.close()


def _level_runs(root) -> dict:
    """A run per worst severity: {None: a clean run, "info": ..., "warning": ..., "error": ...}."""
    falling = np.linspace(1.0, 0.1, STEPS)
    healthy = np.tile([1.0, 0.5, 1.0, 0.5], (STEPS, 1))
    zero_bias = healthy.copy()
    zero_bias[:, 3] = 0.0  # b.bias: an exactly zero gradient at every step (info)
    nan_late = falling.copy()
    nan_late[30:] = np.nan  # the loss turns NaN (error)
    runs = {
        None: (falling, healthy),
        "info": (falling, zero_bias),
        "warning": (np.ones(STEPS), healthy),  # a loss that never falls
        "error": (nan_late, healthy),
    }
    out = {}
    for level, (loss, grads) in runs.items():
        out[level] = root / (level or "clean")
        _write(out[level], loss, grads)
    return out


@pytest.fixture(scope="module")
def level_runs(tmp_path_factory):
    return _level_runs(tmp_path_factory.mktemp("levels"))


def _expected_status(present: set, fail_on) -> int:
    if fail_on is None:
        return 0
    return int(any(ORDER.index(level) >= ORDER.index(fail_on) for level in present))


def test_each_run_has_the_worst_severity_it_was_written_for(level_runs, capsys):
    """The matrix below means something only if each run's worst finding is the one intended."""
    for level, path in level_runs.items():
        assert cli.main(["report", str(path.parent), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        worst = {d["severity"] for d in doc if d["run"] == path.name}
        assert max(worst, key=ORDER.index, default=None) == level, (level, doc)


@pytest.mark.parametrize("fail_on", [None, "info", "warning", "error"], ids=str)
def test_fail_on_exit_status_for_every_combination_of_levels(level_runs, tmp_path, fail_on, capsys):
    """Every set of severities present (none, one, two or all three) against the flag: 1 exactly when
    a finding at or above the flag's level exists, 0 without the flag."""
    levels = [lv for lv in level_runs if lv is not None]
    for n in range(len(levels) + 1):
        for present in itertools.combinations(levels, n):
            logdir = tmp_path / ("-".join(present) or "none")
            shutil.copytree(level_runs[None], logdir / "clean")
            for level in present:
                shutil.copytree(level_runs[level], logdir / level)
            argv = ["report", str(logdir)] + (["--fail-on", fail_on] if fail_on else [])
            assert cli.main(argv) == _expected_status(set(present), fail_on), (present, fail_on)
    capsys.readouterr()


def test_the_installed_command_exits_with_the_status(level_runs, tmp_path):
    """Through the real command: only warnings present, --fail-on error passes and --fail-on warning fails."""
    logdir = tmp_path / "warnings_only"
    shutil.copytree(level_runs["warning"], logdir / "warning")
    cmd = [sys.executable, "-m", "tb_diag_plugin", "report", str(logdir), "--fail-on"]
    assert subprocess.run(cmd + ["error"], capture_output=True, timeout=300).returncode == 0
    assert subprocess.run(cmd + ["warning"], capture_output=True, timeout=300).returncode == 1


# ---------------------------------------------------------------- export
ODD = 'odd, "quoted"\nname é'


@pytest.fixture(scope="module")
def export_logdir(tmp_path_factory):
    """Two runs with known values (non-finite ones and a name that needs quoting); returns (logdir, rows)."""
    root = tmp_path_factory.mktemp("export_cli")
    rng = np.random.default_rng(0)
    rows = {}  # (run, metric, layer, step) -> value as float32
    for run, steps in (("a", 5), ("b", 3)):
        sink = EventWriter(str(root / run))
        for step in range(steps):
            loss = np.array([rng.random(), [np.nan, np.inf, -np.inf][step % 3]], np.float32)
            grads = (rng.random(2) * 10.0 ** rng.integers(-30, 30, 2)).astype(np.float32)
            sink.write_vectors(10 * step, [("loss", ["total", ODD], (), loss), ("grad_norm", ["w", "b"], (), grads)])
            for layer, value in zip(["total", ODD], loss):
                rows[(run, "loss", layer, 10 * step)] = float(value)
            for layer, value in zip(["w", "b"], grads):
                rows[(run, "grad_norm", layer, 10 * step)] = float(value)
            sink.add_scalar("user/loss", 1.0, step)  # the user's own scalars stay out
        sink.close()
    return str(root), rows


def _export(logdir: str, *flags: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "tb_diag_plugin", "export", logdir, *flags],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _same_values(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert (math.isnan(value) and math.isnan(got[key])) or got[key] == value, (key, got[key], value)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_of_one_run_in_each_format_equals_what_was_written(export_logdir, fmt):
    logdir, rows = export_logdir
    text = _export(logdir, "--run", "b", "--format", fmt)
    if fmt == "csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        assert next(reader) == ["run", "metric", "layer", "step", "value"]
        records = [(r, m, layer, int(step), float(v)) for r, m, layer, step, v in reader]
    else:
        objects = [json.loads(line) for line in text.splitlines()]
        assert all(list(o) == ["run", "metric", "layer", "step", "value"] for o in objects)
        records = [tuple(o.values()) for o in objects]
    got = {tuple(r[:4]): r[4] for r in records}
    assert len(got) == len(records), "a row exported twice"
    _same_values(got, {k: v for k, v in rows.items() if k[0] == "b"})


def test_export_without_run_holds_every_run_and_defaults_to_csv(export_logdir):
    logdir, rows = export_logdir
    reader = csv.reader(io.StringIO(_export(logdir), newline=""))
    assert next(reader) == ["run", "metric", "layer", "step", "value"]
    _same_values({(r, m, layer, int(step)): float(v) for r, m, layer, step, v in reader}, rows)
