"""The data contract (metadata) and the server-side downsampling, as pure functions."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from tensorboard.compat.proto import summary_pb2

from tb_diag_plugin import metadata, plugin_data_pb2
from tb_diag_plugin.diagnostics_plugin import DEFAULT_SAMPLES, DiagnosticsLoader
from tb_diag_plugin.reading import downsample


def test_metadata_round_trip():
    meta = metadata.create_summary_metadata("grad_norm", ["a.weight", "a.bias"], ["", ""])
    assert meta.plugin_data.plugin_name == "diagnostics"
    assert meta.data_class == summary_pb2.DATA_CLASS_TENSOR
    pd = metadata.parse_plugin_data(meta.plugin_data.content)
    assert pd.metric == "grad_norm" and pd.layers == ("a.weight", "a.bias")
    assert pd.version == metadata.PROTO_VERSION


def test_structure_metadata_is_blob_sequence():
    meta = metadata.create_summary_metadata("structure", (), kind=metadata.STRUCTURE)
    assert meta.data_class == summary_pb2.DATA_CLASS_BLOB_SEQUENCE


def test_tag_depends_on_layer_set():
    a = metadata.vector_tag("grad_norm", ["x", "y"])
    assert a == metadata.vector_tag("grad_norm", ["x", "y"])
    assert a != metadata.vector_tag("grad_norm", ["x"])
    assert a.startswith("diagnostics/grad_norm/")


def test_a_tag_follows_the_names_when_the_same_list_is_asked_again_or_changed_in_place():
    def expected(metric, names):  # the tag's definition, computed here without the cache
        return f"diagnostics/{metric}/" + hashlib.sha1("\n".join(names).encode("utf-8")).hexdigest()[:10]

    names = [f"layer.{i}.weight" for i in range(3000)]
    assert metadata.vector_tag("grad_norm", names) == expected("grad_norm", names)
    assert metadata.vector_tag("grad_norm", names) == expected("grad_norm", names)  # asked again: cached
    assert metadata.vector_tag("weight_norm", names) == expected("weight_norm", names)
    names[1500] = "renamed.weight"  # the same list object, other names
    assert metadata.vector_tag("grad_norm", names) == expected("grad_norm", names)
    names.append("extra")
    assert metadata.vector_tag("grad_norm", names) == expected("grad_norm", names)
    assert metadata.vector_tag("grad_norm", tuple(names)) == expected("grad_norm", names)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xff\xff", "undecodable"),
        (plugin_data_pb2.DiagnosticsPluginData(metric="x").SerializeToString(), "no contract version"),
        (plugin_data_pb2.DiagnosticsPluginData(version=99, metric="x").SerializeToString(), "newer tb-diag"),
        (plugin_data_pb2.DiagnosticsPluginData(version=1).SerializeToString(), "no metric"),
        (
            plugin_data_pb2.DiagnosticsPluginData(version=1, metric="x", layers=["a"], layer_types=["t", "u"])
            .SerializeToString(),
            "differ in length",
        ),
    ],
)
def test_bad_metadata_is_a_contract_error(content, message):
    with pytest.raises(metadata.ContractError, match=message):
        metadata.parse_plugin_data(content)


def test_binning_keeps_extremes_and_nonfinite():
    steps = np.arange(100, dtype=np.int64)
    values = np.ones((100, 2), dtype=np.float32)
    values[37, 0] = 1000.0  # a spike
    values[81, 1] = np.nan
    values[82, 1] = np.inf
    present = np.ones_like(values, dtype=bool)
    present[:10, 1] = False  # layer 1 absent at first
    b = downsample.bin_steps(steps, values, present, 10)
    assert b.binned and b.mean.shape == (10, 2)
    assert b.max[3, 0] == 1000.0 and b.min[3, 0] == 1.0
    assert b.nonfinite[8, 1] == 2 and np.isfinite(b.mean[8, 1])  # other values in that bin are finite
    assert b.present[0, 1] == 0 and b.present[1, 1] == 10
    assert np.isnan(b.mean[0, 1])
    assert list(b.step_first) == list(range(0, 100, 10))
    assert list(b.step_last) == list(range(9, 100, 10))


def test_binning_all_nonfinite_bin_is_nan():
    values = np.full((4, 1), np.nan, dtype=np.float32)
    b = downsample.bin_steps(np.arange(4), values, np.ones((4, 1), bool), 2)
    assert np.isnan(b.mean).all() and (b.nonfinite == 2).all()


@pytest.mark.parametrize("seed, S, L, points", [(0, 103, 3, 10), (1, 1000, 7, 37), (2, 50, 2, 49), (3, 999, 4, 1)])
def test_binning_matches_a_bin_by_bin_reference(seed, S, L, points):
    """Random NaN, Inf and absent cells (a whole bin of them too), short last bin: every field as computed by hand."""
    rng = np.random.default_rng(seed)
    values = rng.lognormal(size=(S, L)).astype(np.float32)
    values[rng.random((S, L)) < 0.02] = np.nan
    values[rng.random((S, L)) < 0.01] = -np.inf
    present = rng.random((S, L)) > 0.05
    present[: S // 4, 0] = False
    values[~present] = np.nan  # absent cells hold NaN, as the reader stores them
    steps = np.arange(S, dtype=np.int64) * 3
    b = downsample.bin_steps(steps, values, present, points)
    k = -(-S // points)
    assert b.binned == (S > points)
    for i, lo in enumerate(range(0, S, k) if b.binned else []):
        hi = min(lo + k, S)
        assert b.step_first[i] == steps[lo] and b.step_last[i] == steps[hi - 1]
        for j in range(L):
            v, p = values[lo:hi, j], present[lo:hi, j]
            good = v[p & np.isfinite(v)]
            assert b.present[i, j] == p.sum() and b.nonfinite[i, j] == (p & ~np.isfinite(v)).sum()
            if good.size:
                assert b.min[i, j] == good.min() and b.max[i, j] == good.max()
                assert b.mean[i, j] == pytest.approx(good.astype(np.float64).mean(), rel=1e-5)
            else:
                assert np.isnan(b.mean[i, j]) and np.isnan(b.min[i, j]) and np.isnan(b.max[i, j])


def test_binning_a_complete_finite_matrix_takes_no_masks():
    values = np.arange(40, dtype=np.float32).reshape(20, 2)
    b = downsample.bin_steps(np.arange(20), values, np.broadcast_to(np.True_, (20, 2)), 3)
    assert list(b.present[:, 0]) == [7, 7, 6] and (b.nonfinite == 0).all()
    assert b.mean[2, 1] == pytest.approx(np.arange(29, 40, 2).mean())


def test_no_binning_when_it_fits():
    values = np.array([[1.0], [np.nan]], dtype=np.float32)
    b = downsample.bin_steps(np.array([0, 5]), values, np.ones((2, 1), bool), 10)
    assert not b.binned and np.isnan(b.mean[1, 0]) and b.nonfinite[1, 0] == 1


def test_step_window():
    steps = np.array([0, 10, 20, 30])
    assert downsample.step_window(steps, 5, 20) == slice(1, 3)
    assert downsample.step_window(steps, None, None) == slice(0, 4)


class _Flags:
    pass


def test_fix_flags_sets_default_only_when_user_gave_none():
    loader = DiagnosticsLoader()
    f = _Flags()
    f.samples_per_plugin = {"scalars": 5}
    f.diagnostics_samples = DEFAULT_SAMPLES
    loader.fix_flags(f)
    assert f.samples_per_plugin == {"scalars": 5, "diagnostics": DEFAULT_SAMPLES}
    f.samples_per_plugin = {"diagnostics": 7}
    loader.fix_flags(f)
    assert f.samples_per_plugin["diagnostics"] == 7
    f.diagnostics_samples = -1
    with pytest.raises(ValueError, match="diagnostics_samples"):
        loader.fix_flags(f)


def test_tensorboard_side_imports_neither_torch_nor_plotly():
    """TensorBoard imports the entry point at start-up: it must stay light and safe."""
    import subprocess
    import sys

    code = (
        "import sys, tb_diag_plugin.diagnostics_plugin, tb_diag_plugin.findings, tb_diag_plugin.export,"
        " tb_diag_plugin.cli;"
        "print('torch' in sys.modules, 'plotly' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split() == ["False", "False"]


def test_cli_demo_trains_through_the_logger_side(tmp_path):
    """`tb-diag demo` imports the demo (and torch) from tb_diag_logger only when asked for."""
    import subprocess
    import sys

    from tb_diag_plugin.reading import LocalReader

    code = (
        "import sys; from tb_diag_plugin import cli; status = cli.main(sys.argv[1:]);"
        "print(sorted(m for m in sys.modules if m.endswith('demo'))); sys.exit(status)"
    )
    proc = subprocess.run([sys.executable, "-c", code, "demo", "--logdir", str(tmp_path), "--steps", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "['tb_diag_logger.demo']" in proc.stdout
    reader = LocalReader(str(tmp_path))
    for run in ("healthy", "vanishing_sigmoid", "dying_relu", "diverging"):
        assert reader.series(run)["loss"].steps.tolist() == [0, 2]  # every=2 of 3 steps


def test_the_logger_writes_only_contract_metrics(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from tb_diag_logger.summaries import SummarySink
    from tb_diag_plugin.reading import LocalReader

    w = SummaryWriter(str(tmp_path))
    sink = SummarySink(w)
    one = np.array([1.0], dtype=np.float32)
    with pytest.raises(ValueError, match="'grad_nrom' is not in the contract"):
        sink.write_vectors(0, [("loss", ["total"], (), one), ("grad_nrom", ["a.weight"], (), one)])
    with pytest.raises(ValueError, match="grad_to_weight"):  # derived in the tab, never recorded
        sink.write_vectors(0, [("grad_to_weight", ["a.weight"], (), one)])
    sink.write_vectors(1, [("loss", ["total"], (), one)])
    w.close()
    series = LocalReader(str(tmp_path)).series(".")
    assert list(series) == ["loss"] and series["loss"].steps.tolist() == [1]  # the refused step wrote nothing


def test_contract_names_are_consistent():
    names = [m.name for m in metadata.METRIC_SPECS]
    assert len(names) == len(set(names))
    for m in metadata.METRIC_SPECS:
        assert m.layer_kind in metadata.LAYER_KINDS and m.scale in metadata.SCALES and m.view in metadata.VIEWS, m
        assert all(n in metadata.METRICS and not metadata.METRICS[n].needs for n in m.needs), m
    assert set(metadata.FINDING_VIEW) == set(metadata.FINDING_KINDS)
    for view, metric in metadata.FINDING_VIEW.values():
        assert view in metadata.VIEWS and (metric is None or metric in metadata.METRICS)
    assert [metadata.SEVERITY_RANK[s] for s in metadata.SEVERITIES] == [0, 1, 2]
    assert set(metadata.OVERVIEW_METRICS) <= set(metadata.ALL_METRICS)
    # The logger's spread order is its quantiles': min, 5/25/50/75/95 %, max.
    assert metadata.LOSS_SPREAD_METRICS == ("loss_min", "loss_p05", "loss_p25", "loss_p50", "loss_p75", "loss_p95",
                                            "loss_max")
    for agreed in ("grad_norm_preclip", "val_loss", "val_metric", "grad_missing", "logit_max_abs", "logit_lse",
                   "adam_eps_fraction", "update_rms"):
        assert agreed in metadata.ALL_METRICS
    for agreed in ("loss_diverged", "overfitting", "underfitting", "no_gradient", "weight_norm_growth",
                   "weight_decay_equilibrium", "gradient_clipping", "logit_growth", "adam_eps"):
        assert agreed in metadata.FINDING_KINDS
