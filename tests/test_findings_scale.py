"""Findings at the scale of thousands of tensors (issue 24): the per-tensor spike pass done for all
columns at once equals the per-column detector."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.context import RequestContext

from tb_diag_plugin.findings.context import step_noise, step_noise_columns
from tb_diag_plugin.findings.rules.spikes import column_spikes, spikes
from tb_diag_plugin.findings.thresholds import Thresholds


def _in_a_fresh_process(test):
    """Run `test` in a fresh interpreter: tracemalloc counts every thread, and the TensorBoards that earlier
    tests start in the test process leave reload threads there that allocate 16 MiB buffers."""
    @functools.wraps(test)
    def run_alone(*args, **kwargs):
        if os.environ.get("TB_DIAG_FRESH_PROCESS") == test.__name__:
            return test(*args, **kwargs)
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{test.__name__}"],
            env={**os.environ, "TB_DIAG_FRESH_PROCESS": test.__name__}, capture_output=True, text=True,
            timeout=900)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]

    return run_alone


def _planted(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    """Log-normal norms with a drift, planted spikes (x3 to x1000), NaN, +inf, zeros and negatives."""
    v = np.exp(rng.normal(0.0, rng.uniform(0.05, 1.5), (n, width)) - np.log1p(np.arange(n) / 50)[:, None])
    u = rng.random((n, width))
    v[u < 0.06] *= rng.uniform(3.0, 1000.0, int((u < 0.06).sum()))
    v[(u >= 0.06) & (u < 0.08)] = np.nan
    v[(u >= 0.08) & (u < 0.09)] = np.inf
    v[(u >= 0.09) & (u < 0.10)] = 0.0
    v[(u >= 0.10) & (u < 0.105)] = -1.0
    return v


@pytest.mark.parametrize("seed", range(4))
def test_the_columns_at_once_find_what_each_column_alone_finds(seed):
    rng = np.random.default_rng(seed)
    th = Thresholds()
    found = 0
    for n in (1, 3, 4, 5, 7, 20, 21, 22, 60, 300):
        width = int(rng.integers(1, 40))
        v = _planted(rng, n, width)
        v[:, 0] = np.nan  # a column never recorded
        if width > 2:
            v[: n // 2, 1] = np.nan  # one recorded only from the middle on
        want = {j: s for j in range(width) if (s := spikes(v[:, j], th, draws=width))}
        assert column_spikes(v, th, draws=width) == want, n
        found += sum(map(len, want.values()))
    assert found > 0  # the planted spikes are found, so the comparison compares something


def test_columns_wider_than_one_block_are_searched_block_by_block():
    rng = np.random.default_rng(7)
    th = Thresholds()
    v = _planted(rng, 120, 50)
    want = {j: s for j in range(50) if (s := spikes(v[:, j], th, draws=50))}
    seven = 8 * 120 * 7  # blocks of 7 columns
    assert column_spikes(v, th, draws=50, block_bytes=seven) == want and want
    # Some columns only (the rule leaves the biases out), by their position among those asked for.
    some = [j for j in range(50) if j % 3]
    assert (column_spikes(v, th, draws=50, columns=some, block_bytes=seven)
            == {k: want[j] for k, j in enumerate(some) if j in want})


@pytest.mark.parametrize("seed", range(3))
def test_each_columns_step_noise_equals_the_series_step_noise(seed):
    rng = np.random.default_rng(seed)
    for n in (1, 2, 3, 4, 5, 9, 40, 201):
        x = rng.normal(0.0, rng.uniform(0.01, 3.0), (n, 12))
        x[rng.random(x.shape) < 0.2] = np.nan
        x[:, 3] = np.nan
        x[:, 4] = 1.5  # constant: no noise at all
        got = step_noise_columns(x)
        assert got.tolist() == [step_noise(x[:, j]) for j in range(12)], n


# --------------------------------------------- the findings of a run too big for the cache
STEPS, WIDE = 1500, 400  # each per-tensor metric: 1,500 x 400 float32 = 2.4 MB
BROKE_AT = 40  # the step whose gradients hold the first NaN: the rules judge the 40 steps before it
WIDE_NAMES = [f"blocks.{i // 4}.{('conv', 'bn')[i % 2]}{i % 4}.weight" for i in range(WIDE)]
METRIC_BYTES = STEPS * WIDE * 4
# A budget of 1 MiB: each per-tensor metric is over a quarter of it, so it is served on demand.
SMALL = 1 << 20


def _write_wide_run(logdir: str) -> None:
    """Four per-tensor metrics with a gradient spike at step 25 and a NaN from step BROKE_AT on."""
    import os

    from tb_diag_plugin import metadata
    from tb_diag_plugin.summary import EventWriter

    rng = np.random.default_rng(3)
    base = rng.normal(-3.0, 1.0, WIDE)
    with EventWriter(os.path.join(logdir, "wide")) as w:
        for step in range(STEPS):
            g = np.exp(base + rng.normal(0, 0.2, WIDE) - np.log1p(step / 100)).astype(np.float32)
            if step == 25:
                g[7] *= 500.0
            if step >= BROKE_AT and step % 50 == BROKE_AT % 50:
                g[step % WIDE] = np.nan
            weights = np.exp(base + 2.0 + rng.normal(0, 0.01, WIDE)).astype(np.float32)
            items = [("grad_norm", WIDE_NAMES, (), g),
                     ("grad_nonfinite", WIDE_NAMES, (), np.isnan(g).astype(np.float32)),
                     ("weight_norm", WIDE_NAMES, (), weights),
                     ("update_ratio", WIDE_NAMES, (), (1e-3 * g / weights).astype(np.float32)),
                     ("grad_norm_total", [""], (), np.array([np.sqrt(np.nansum(g.astype(np.float64) ** 2))],
                                                          np.float32)),
                     ("learning_rate", [""], (), np.array([0.1], np.float32)),
                     ("loss", [metadata.TOTAL_LOSS], (), np.array([2.0 / (1 + step / 50)], np.float32))]
            w.write_vectors(step, items)


@pytest.fixture(scope="module")
def wide_logdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("wide")
    _write_wide_run(str(d))
    return str(d)


def _rules_inputs_and_findings(logdir: str, cache_bytes: int) -> tuple[dict, dict]:
    """(the metrics the rules read, as the store hands them over; the /findings answer) from a real
    TensorBoard with that cache budget, once it has every step of the run."""
    from tb_diag_plugin.serving.config import Config
    from tbserver import serve_with_plugin, until

    with serve_with_plugin(logdir, load_fast=True, extra=["--diagnostics_preload", "false"],
                           config=Config(cache_bytes=cache_bytes)) as (srv, plugin):
        srv.wait_for_runs(1)
        # The Rust data server loads in the background: on until it has every step of the run.
        until(lambda: all(srv.plugin(f"values?run=wide&metric={m}&points=1&start={STEPS - 1}")["last_step"]
                          == STEPS - 1 for m in ("loss", "grad_norm", "update_ratio")))
        store = plugin.store
        inputs = store.rules_inputs(RequestContext(), "", "wide", store.index(RequestContext(), "")["wide"])
        return inputs, srv.plugin("findings?run=wide")


_PEAK_IN_A_FRESH_PROCESS = """
import json, sys, tracemalloc
sys.path.insert(0, sys.argv[1])
from test_findings_scale import SMALL, _rules_inputs_and_findings
from tb_diag_plugin.findings.run import analyze_run
from tb_diag_plugin.series import PiecewiseSeries

small, _ = _rules_inputs_and_findings(sys.argv[2], SMALL)
piecewise = sorted(m for m, s in small.items() if isinstance(s, PiecewiseSeries))
peaks = []
for _ in range(3):
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = analyze_run("wide", small, lambda: None)
        peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
got = result.answer({})
print(json.dumps({"piecewise": piecewise, "peaks": peaks, "findings": got["findings"],
                  "layers_text": got["layers_text"]}))
"""


def test_a_run_too_big_for_the_cache_is_judged_a_span_of_rows_at_a_time(wide_logdir):
    """Served on demand, the four per-tensor metrics (9.6 MB) are never held whole while the rules judge
    them: the rules' peak (tracemalloc, which sees every buffer numpy allocates) follows the rows they
    judge (the 40 before the NaN), below one metric, and the findings are those of the metrics read whole
    (the default budget).

    Measured in a fresh process: tracemalloc counts every thread, and the TensorBoard servers of earlier
    tests leave reload threads in the test process that allocate 16 MiB buffers (seen in the full suite).
    The least of three analyses: one stray allocation cannot decide it; a rule holding a whole metric
    exceeds the bound every time."""
    import json
    import os
    import subprocess
    import sys

    from tb_diag_plugin.cache import nbytes

    whole, answer = _rules_inputs_and_findings(wide_logdir, 1 << 30)
    per_tensor = ("grad_norm", "grad_nonfinite", "weight_norm", "update_ratio")
    assert nbytes([whole[m].values for m in per_tensor]) >= 4 * METRIC_BYTES  # read whole: all four held
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _PEAK_IN_A_FRESH_PROCESS, here, wide_logdir],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(per_tensor) <= set(got["piecewise"])
    assert {"nonfinite", "gradient_spike"} <= {f["kind"] for f in got["findings"]}  # what was planted is found
    assert got["findings"] == answer["findings"] and got["layers_text"] == answer["layers_text"]
    assert min(got["peaks"]) < METRIC_BYTES, got["peaks"]


# --------------------------------------------- the rules' memory on a healthy wide run
def _healthy_run(steps_n: int, width: int) -> dict:
    """A healthy run held in memory (no NaN, no spike: the rules judge every row): the four per-tensor
    metrics as float32 [steps x tensors], every cell recorded, and the model-level series."""
    from tb_diag_plugin import metadata
    from tb_diag_plugin.series import Series

    rng = np.random.default_rng(11)
    steps = np.arange(steps_n, dtype=np.int64)
    names = [f"blocks.{i // 3}.{('conv', 'bn', 'bn')[i % 3]}.{('weight', 'weight', 'bias')[i % 3]}"
             for i in range(width)]
    base = rng.normal(-3.0, 0.5, width).astype(np.float32)

    def lognormal(shift: float, noise: float) -> np.ndarray:
        v = rng.standard_normal((steps_n, width), dtype=np.float32)
        v *= noise
        v += base + shift
        return np.exp(v - np.log1p(steps / 2000.0).astype(np.float32)[:, None])

    def series(metric: str, layers: list[str], values: np.ndarray) -> Series:
        return Series(metric, layers, [""] * len(layers), steps, values.astype(np.float32, copy=False),
                      np.broadcast_to(np.True_, values.shape))

    g = lognormal(0.0, 0.2)
    run = {"grad_norm": series("grad_norm", names, g),
           "grad_nonfinite": series("grad_nonfinite", names, np.zeros((steps_n, width), np.float32)),
           "weight_norm": series("weight_norm", names, lognormal(3.0, 0.001)),
           "update_ratio": series("update_ratio", names, lognormal(-4.0, 0.2))}
    run["grad_norm_total"] = series("grad_norm_total", [""], np.sqrt(
        (g.astype(np.float64) ** 2).sum(axis=1, keepdims=True)))
    run["learning_rate"] = series("learning_rate", [""], np.full((steps_n, 1), 1e-3))
    run["loss"] = series("loss", [metadata.TOTAL_LOSS], (2.0 / (1 + steps / 500))[:, None])
    return run


@_in_a_fresh_process
def test_the_rules_hold_no_copy_of_a_wide_metric_between_rules():
    """Between rules, nothing the size of a per-tensor metric is held: `before_cutoff` hands out the
    recorded float32 matrix itself (read as float64 a part at a time), not a float64 copy kept from a
    metric's first rule to its last (which held three of them, 6x a metric, at once)."""
    import dataclasses
    import tracemalloc

    from tb_diag_plugin import findings
    from tb_diag_plugin.findings.registry import ORDER

    findings.analyze(_healthy_run(40, 30))  # what the rules import on first use (numpy.ma) is not counted
    run = _healthy_run(400, 1200)
    metric_bytes = run["grad_norm"].values.nbytes
    held: list[tuple[str, int]] = []
    shared: list[bool] = []

    def measured(rule):
        def check(ctx, _check=rule.check):
            _check(ctx)
            held.append((rule.name, tracemalloc.get_traced_memory()[0] - before))
            for m in ("grad_norm", "weight_norm", "update_ratio"):
                if rule.name == "update_ratio":  # every cell recorded, no cutoff: the recorded values as they are
                    vals = ctx.before_cutoff(run[m])[1]
                    shared.append(np.shares_memory(getattr(vals, "kept", vals), run[m].values))
        return dataclasses.replace(rule, check=check)

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        findings.analyze(run, rules=[measured(r) for r in ORDER])
    finally:
        tracemalloc.stop()
    assert len(held) == len(ORDER)
    assert max(b for _, b in held) < metric_bytes // 4, held
    assert shared == [True, True, True]


@_in_a_fresh_process
def test_the_rules_peak_on_a_healthy_wide_run_is_a_few_blocks_not_copies_of_its_metrics():
    """The whole analysis of a healthy 3,000 x 4,000 run (46 MiB per float32 metric, every row judged) peaks
    (tracemalloc: every buffer numpy allocates) under 3x one metric: the rules work on a block of steps or
    tensors at a time (`context.BLOCK_BYTES` of float64 each), whatever the run's length. Each float64
    copy of grad_norm, weight_norm and update_ratio held across rules was 2x a metric (8x in all)."""
    import tracemalloc

    from tb_diag_plugin import findings
    from tb_diag_plugin.findings.context import BLOCK_BYTES

    findings.analyze(_healthy_run(40, 30))  # what the rules import on first use (numpy.ma) is not counted
    run = _healthy_run(3000, 4000)
    metric_bytes = run["grad_norm"].values.nbytes
    assert metric_bytes > 2 * BLOCK_BYTES  # long enough that the blocks are smaller than the metrics
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        found, _ = findings.analyze(run)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert not {"nonfinite", "exploding_gradient", "gradient_spike"} & {f.kind for f in found}  # judged whole
    assert peak < 3 * metric_bytes, (peak / metric_bytes, [f.kind for f in found])


class _InPieces:
    """A metric's source as the store hands one too big for its cache to `PiecewiseSeries` (what
    `reading.ondemand.OnDemandSeries` is): the rows asked for, read (copied) when asked; never the whole."""

    def __init__(self, s) -> None:
        self.s = s
        self.metric, self.layers, self.layer_types, self.steps = s.metric, s.layers, s.layer_types, s.steps

    def pieces(self, k: int, window: slice = slice(None)):
        lo, hi, _ = window.indices(self.steps.size)
        yield self.steps[lo:hi], self.s.values[lo:hi].copy(), self.s.present[lo:hi]

    def load(self):
        raise AssertionError(f"{self.metric} read whole")


@_in_a_fresh_process
def test_a_healthy_run_read_in_pieces_is_judged_within_its_budget_plus_the_rules_blocks(tmp_path):
    """A healthy run (every row judged) whose per-tensor metrics are each 9x the budget they are read in
    (`PiecewiseSeries`, as the store serves a metric too big for its cache): the analysis peaks (tracemalloc)
    under the budget plus the rules' block temporaries (`context.BLOCK_BYTES` each), and four times the steps
    add less than the budget to it. The rows the rules judge of the per-tensor and per-site metrics lie in
    files of the analysis (removed at its end), not in memory (held there, grad_norm, weight_norm and
    update_ratio alone were 3x a metric), and no read from them copies more than a block. The findings are
    those of the run held in memory (a tensor whose gradients vanish is planted)."""
    import dataclasses
    import tempfile
    import tracemalloc

    from tb_diag_plugin import findings
    from tb_diag_plugin.findings.context import BLOCK_BYTES, SpilledRows
    from tb_diag_plugin.findings.registry import ORDER
    from tb_diag_plugin.series import PiecewiseSeries, Series

    tempfile.tempdir = str(tmp_path)  # where the analysis keeps its files
    budget = 8 << 20
    findings.analyze(_healthy_run(40, 30))  # what the rules import on first use (numpy.ma) is not counted
    peaks, metric_bytes, spilled, copied = {}, {}, [], []
    columns = SpilledRows._columns

    def copies(self, cols, lo, hi):  # what each read copies from a file
        out = columns(self, cols, lo, hi)
        copied.append(out.nbytes)
        return out

    SpilledRows._columns = copies

    def in_files(rule):
        def check(ctx, _check=rule.check):
            _check(ctx)
            if rule.name in ("dead_relu", "update_ratio"):  # each metric read by then, and by this rule
                for m in ("dead_fraction",) if rule.name == "dead_relu" else ("grad_norm", "weight_norm",
                                                                              "update_ratio"):
                    kept = ctx.before_cutoff(ctx.series[m])[1].kept
                    # in a file of the temporary directory that no name points to: nothing is left behind
                    # even if the process is killed now
                    spilled.append(isinstance(kept, SpilledRows) and kept.path.startswith(str(tmp_path))
                                   and os.fstat(kept._fd).st_nlink == 0
                                   and os.fstat(kept._fd).st_dev == os.stat(tmp_path).st_dev
                                   and not os.listdir(tmp_path))
        return dataclasses.replace(rule, check=check)

    for n in (1200, 4800):
        run = _healthy_run(n, 4000)
        run["grad_norm"].values[:, 4] *= 1e-6  # 'blocks.1.bn.weight' gets almost no gradient
        sites = [f"blocks.{i}.relu" for i in range(1000)]
        dead = np.random.default_rng(n).uniform(0.0, 0.2, (n, len(sites))).astype(np.float32)
        run["dead_fraction"] = Series("dead_fraction", sites, ["ReLU"] * len(sites), run["loss"].steps, dead,
                                      np.broadcast_to(np.True_, dead.shape))
        metric_bytes[n] = run["grad_norm"].values.nbytes
        want = findings.analyze(run)[0] if n == 1200 else None
        for m in ("grad_norm", "grad_nonfinite", "weight_norm", "update_ratio", "dead_fraction"):
            run[m] = PiecewiseSeries(_InPieces(run[m]), budget)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            found, _ = findings.analyze(run, rules=[in_files(r) for r in ORDER])
            peaks[n] = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        assert [(f.kind, f.layers) for f in found] == [("vanishing_gradient", ["blocks.1.bn.weight"])]
        if want is not None:
            assert [f.to_dict("r") for f in found] == [f.to_dict("r") for f in want]
        assert not os.listdir(tmp_path), "the analysis' files are removed"
    assert spilled == [True] * 8
    assert copied and max(copied) <= BLOCK_BYTES // 2  # a block of float64 is half as many float32 bytes
    assert metric_bytes[4800] > 8 * budget
    assert peaks[4800] < budget + 6 * BLOCK_BYTES, {n: p / 2**20 for n, p in peaks.items()}
    assert peaks[4800] < peaks[1200] + budget, {n: p / 2**20 for n, p in peaks.items()}


@pytest.mark.parametrize("seed", range(3))
def test_the_median_of_float32_columns_equals_numpys_on_their_float64_copy(seed, tmp_path):
    """`nanmedian_of` (weight_decay_equilibrium's pinned update ratio) partitions the float32 values: the
    same number as np.nanmedian of the float64 copy, with NaN, infinities, ties, and below and above the
    600 values where numpy changes method; of values kept in a file, it counts their bits a block at a time
    (two passes) to the same number."""
    import math
    import warnings

    from tb_diag_plugin.findings.context import Float64Rows, SpilledRows, nanmedian_of

    rng = np.random.default_rng(seed)
    for t in range(300):
        r, c = int(rng.integers(1, 60)), int(rng.integers(1, 40))
        x = (rng.lognormal(-3, 2, (r, c)) * rng.choice([1, -1], (r, c))).astype(np.float32)
        if t % 3 == 0:
            x = np.round(x, 1)  # ties
        u = rng.random((r, c))
        x[u < rng.random() * 0.5] = np.nan
        x[u > 0.97] = (np.inf, -np.inf)[t % 2]
        if t % 11 == 0:
            x[:] = np.nan
        cols = sorted(rng.choice(c, int(rng.integers(1, c + 1)), replace=False).tolist())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = float(np.nanmedian(x.astype(np.float64)[:, cols]))
        spilled = SpilledRows(str(tmp_path / f"{t}.f32"), x.shape)
        spilled.write(0, x[: r // 2])
        spilled.write(r // 2, x[r // 2:])
        for values in (Float64Rows(x), x.astype(np.float64), Float64Rows(spilled)):
            got = nanmedian_of(values, cols)
            assert got == want or (math.isnan(got) and math.isnan(want)), (t, got, want)
        spilled.close()


def test_every_part_of_a_matrix_kept_in_a_file_reads_as_numpy_indexes_the_matrix(tmp_path):
    """What the rules index of a `Float64Rows` kept in a file (`SpilledRows`, each tensor's steps together)
    equals the same index of the float64 copy of the matrix, in value, shape and dtype: rows, blocks of rows
    or tensors, columns picked, a mesh of rows and columns, a mask of rows, one cell; `finite` of it a part
    at a time; and it is written a span of rows at a time."""
    from tb_diag_plugin.findings.context import Float64Rows, SpilledRows, finite

    rng = np.random.default_rng(5)
    x = rng.lognormal(0, 1, (37, 11)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    x[3, 4], x[5, 6] = np.inf, -np.inf
    spilled = SpilledRows(str(tmp_path / "m.f32"), x.shape)
    for lo in range(0, 37, 10):
        spilled.write(lo, x[lo: lo + 10])
    rows, cols = np.array([0, 5, 6, 36]), np.array([1, 2, 9])
    wide, want = Float64Rows(spilled), x.astype(np.float64)
    for index in (0, -1, slice(3, 9), slice(None, 5), (slice(None), 4), (slice(None), slice(2, 7)),
                  (slice(None), cols), (slice(None), [1, 9]), (rows[:, None], cols[None, :]), (rows, 3),
                  (0, cols), x[:, 0] > 1, (3, 4), (-2, -3), (slice(10, 20), slice(None)), (rows, cols[[0, 1, 1, 2]]),
                  (slice(None, None, 2), 1), (np.array([-1, 2]), slice(3, None)), (slice(5, 5),)):
        got = wide[index]
        assert np.array_equal(got, want[index], equal_nan=True), index
        assert np.shape(got) == np.shape(want[index]) and got.dtype == np.float64, index
        assert np.array_equal(finite(wide)[index], np.isfinite(want[index])), index
    assert np.array_equal(np.asarray(wide), want, equal_nan=True) and len(wide) == 37
    spilled.close()
    assert not os.listdir(tmp_path)
