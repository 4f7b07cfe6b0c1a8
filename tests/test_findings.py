"""Findings: healthy runs are clean, broken runs yield their kind on the right layers.

The labelled runs (`pathologies.py`) are real CPU trainings written through
the logger into real event files and read back with `reading.LocalReader`,
as `tb-diag report` does. The rules' edge cases (AMP, missing metrics,
noise) are checked on hand-built series.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_findings_causes import HEADLINES

from pathologies import CASES, train_all
from tb_diag_plugin import findings, report
from tb_diag_plugin.findings import Finding, ModelInfo, Thresholds, analyze
from tb_diag_plugin.reading import LocalReader, Series

HEALTHY = [n for n, c in CASES.items() if c.healthy]
BROKEN = [n for n, c in CASES.items() if not c.healthy]
DESIGN_KEYS = {"run", "kind", "severity", "layers", "first_step", "last_step", "message", "suggestion"}


@pytest.fixture(scope="session")
def suite(tmp_path_factory):
    """Every labelled case trained once (seed 0): (logdir, {run: (findings, notes)})."""
    d = str(tmp_path_factory.mktemp("suite"))
    train_all(d, seed=0)
    reader = LocalReader(d)
    assert sorted(reader.runs()) == sorted(CASES)
    return d, {name: analyze(reader.series(name), model=ModelInfo.from_structure(reader.structure(name)))
               for name in reader.runs()}


def _fired(found: list[Finding]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in found:
        if f.severity != "info":
            out.setdefault(f.kind, set()).update(f.layers)
    return out


# ---------------------------------------------------------------- labelled runs
@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_run_has_nothing_above_info(suite, name):
    found, _ = suite[1][name]
    loud = [f"{f.severity} {f.kind}: {f.message}" for f in found if f.severity != "info"]
    assert not loud, f"{name} ({CASES[name].note}) is healthy"


@pytest.mark.parametrize("name", BROKEN)
def test_broken_run_yields_its_kind_on_the_right_layers(suite, name):
    case = CASES[name]
    fired = _fired(suite[1][name][0])
    for kind in case.kinds:
        assert kind in fired, f"{name}: expected {kind}, got {sorted(fired)}"
        missing = set(case.layers.get(kind, ())) - fired[kind]
        assert not missing, f"{name}: {kind} should name {sorted(missing)}, named {sorted(fired[kind])}"


@pytest.mark.parametrize("name", BROKEN)
def test_broken_run_has_no_unrelated_warnings(suite, name):
    case = CASES[name]
    unrelated = set(_fired(suite[1][name][0])) - set(case.kinds) - set(case.allowed)
    assert not unrelated, f"{name}: {sorted(unrelated)} are not consequences of its fault"


def test_vanishing_names_the_early_layers_not_the_last(suite):
    # 34 of 40 tensors starved: a run that cannot learn, an error that says "vanishing" first.
    (f,) = [f for f in suite[1]["vanishing_sigmoid"][0] if f.kind == "vanishing_gradient" and f.severity == "error"]
    assert f.message.startswith("Vanishing gradients: ") and "smaller than those of '40.weight'" in f.message
    assert "0.weight" in f.layers and "40.weight" not in f.layers
    assert f.first_step == 0
    assert "40.weight" in f.message  # the reference layer, with the numbers
    assert "Sigmoid" in f.message


def test_nonfinite_reports_where_it_started(suite):
    (f,) = [f for f in suite[1]["nonfinite_log_zero"][0] if f.kind == "nonfinite"]
    assert f.severity == "error" and f.first_step == 60  # the batch with the zero target
    assert f.layers[:2] == ["total", "mse"]  # the loss first, then the gradients it poisoned
    assert "log(0)" in f.suggestion
    (g,) = [f for f in suite[1]["nonfinite_diverging_lr"][0] if f.kind == "nonfinite"]
    assert "diverged" in g.suggestion


def test_conv_bias_before_batchnorm_is_info_only(suite):
    found = suite[1]["healthy_cnn_bn"][0]
    infos = [f for f in found if f.kind == "vanishing_gradient"]
    assert infos and all(f.severity == "info" for f in infos)
    assert set(infos[0].layers) == {"0.bias", "4.bias"}  # the conv biases right before BatchNorm
    assert "bias=False" in infos[0].suggestion


def test_confident_sigmoid_output_is_info_not_saturation(suite):
    found = suite[1]["healthy_tanh_bce"][0]
    sat = [f for f in found if f.kind == "saturated_activation"]
    assert [f.severity for f in sat] == ["info"] and sat[0].layers == ["1"]


def test_every_finding_starts_with_its_problem_in_plain_words(suite):
    assert set(HEADLINES) == set(findings.KINDS)
    seen = set()
    for name, (found, _) in suite[1].items():
        for f in found:
            assert f.message.startswith(HEADLINES[f.kind]), (name, f.kind, f.message)
            seen.add(f.kind)
    assert len(seen) >= 15  # the suite exercises most rules; test_findings_causes.py pins the others


def test_findings_sorted_worst_first(suite):
    for found, _ in suite[1].values():
        keys = [(findings.SEVERITY_RANK[f.severity], f.first_step) for f in found]
        assert keys == sorted(keys)


def test_every_finding_is_complete(suite):
    for name, (found, _) in suite[1].items():
        for f in found:
            assert f.kind in findings.KINDS and f.severity in findings.SEVERITIES
            assert f.layers and all(isinstance(n, str) for n in f.layers)
            assert 0 <= f.first_step <= f.last_step
            assert f.message and "\n" not in f.message and f.suggestion, (name, f)


def test_to_dict_has_exactly_the_design_keys_and_is_json_safe(suite):
    f = suite[1]["exploding_lr_growth"][0][0]
    d = f.to_dict("exploding_lr_growth")
    assert set(d) == DESIGN_KEYS and d["run"] == "exploding_lr_growth"
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert isinstance(d["first_step"], int) and isinstance(d["layers"], list)


def test_notes_say_which_rules_could_not_run(suite):
    notes = suite[1]["healthy_transformer"][1]  # GELU only, one loss component
    assert any(n.startswith("dead_relu:") and "dead_fraction" in n for n in notes)
    assert any(n.startswith("saturated_activation:") for n in notes)
    assert any(n.startswith("loss_component_dominance:") for n in notes)
    assert not any(n.startswith("vanishing_gradient:") for n in notes)


def test_thresholds_are_overridable(suite):
    d = suite[0]
    series = LocalReader(d).series("saturated_sigmoid_large_init")
    assert "saturated_activation" in _fired(analyze(series)[0])
    relaxed = Thresholds().replace(saturation_fraction=0.9)
    assert "saturated_activation" not in _fired(analyze(series, relaxed)[0])
    with pytest.raises(TypeError):
        Thresholds().replace(no_such_threshold=1.0)


class _Recording(dict):
    """A run's series that remembers which metrics were asked for."""

    def __init__(self, *a):
        super().__init__(*a)
        self.asked: set[str] = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)

    def _everything(self, *a, **k):
        raise AssertionError("a rule walked over every series instead of asking for the ones it declares")

    items = keys = values = __iter__ = _everything


def test_each_rule_reads_only_the_metrics_it_declares(suite):
    # The plugin reads only findings.INPUTS for /findings: a rule reading an undeclared metric would
    # silently see it missing there while `report` (which reads everything) sees it.
    from tb_diag_plugin.findings.context import Context
    from tb_diag_plugin.findings.registry import ORDER

    reader = LocalReader(suite[0])
    for name in reader.runs():
        series = _Recording(reader.series(name))
        ctx = Context(series, Thresholds(), model=ModelInfo.from_structure(reader.structure(name)))
        for rule in ORDER:
            series.asked.clear()
            rule.check(ctx)
            extra = series.asked - set(rule.metrics)
            assert not extra, f"{name}: rule {rule.name} reads {sorted(extra)} without declaring it"


def test_findings_from_the_inputs_alone_equal_findings_from_everything(suite):
    reader = LocalReader(suite[0])
    assert "grad_max_abs" not in findings.INPUTS  # something really is left out
    for name in reader.runs():
        everything = reader.series(name)
        inputs = {m: s for m, s in everything.items() if m in findings.INPUTS}
        model = ModelInfo.from_structure(reader.structure(name))
        assert analyze(inputs, model=model) == suite[1][name], name


# ------------------------------------------------------------- hand-built series
def _series(metric: str, layers: list[str], values, steps=None, types=None) -> Series:
    v = np.asarray(values, dtype=np.float32).reshape(len(values), len(layers))
    st = np.arange(v.shape[0], dtype=np.int64) * 10 if steps is None else np.asarray(steps, dtype=np.int64)
    return Series(metric, list(layers), list(types or [""] * len(layers)), st, v, np.ones(v.shape, dtype=bool))


def _kinds(series: dict[str, Series], **th) -> dict[str, str]:
    found, _ = analyze(series, Thresholds(**th) if th else None)
    return {f.kind: f.severity for f in found}


def test_no_series_gives_notes_not_errors():
    found, notes = analyze({})
    assert found == []
    for kind in ("nonfinite", "exploding_gradient", "vanishing_gradient", "dead_relu", "saturated_activation",
                 "update_ratio", "loss_spike", "loss_not_decreasing", "loss_component_dominance"):
        assert any(n.startswith(kind + ":") for n in notes), kind


def test_single_logged_step_does_not_crash():
    s = {
        "loss": _series("loss", ["total"], [[1.0]]),
        "grad_norm": _series("grad_norm", ["a.weight", "a.bias"], [[1.0, 0.0]]),
        "dead_fraction": _series("dead_fraction", ["r"], [[1.0]]),
    }
    found, notes = analyze(s)
    assert any("loss_not_decreasing" in n for n in notes)


def test_amp_skipped_step_is_not_nonfinite():
    n = 30
    grads = np.full((n, 2), 0.5)
    grads[[3, 17], :] = np.inf  # the GradScaler overflowed and skipped these steps, by design
    s = {
        "grad_norm": _series("grad_norm", ["w", "v"], grads),
        "amp_skipped": _series("amp_skipped", [""], [[1.0 if i in (3, 17) else 0.0] for i in range(n)]),
        "amp_scale": _series("amp_scale", [""], [[65536.0 / (2 if i >= 3 else 1)] for i in range(n)]),
        "loss": _series("loss", ["total"], [[2.0 - i * 0.05] for i in range(n)]),
    }
    assert "nonfinite" not in _kinds(s)
    # The same overflow without a GradScaler is a fault.
    del s["amp_skipped"], s["amp_scale"]
    assert _kinds(s)["nonfinite"] == "error"


def test_amp_scale_collapse_is_nonfinite():
    n = 30
    grads = np.full((n, 1), 0.5)
    grads[10:] = np.nan
    s = {
        "grad_norm": _series("grad_norm", ["w"], grads),
        "amp_skipped": _series("amp_skipped", [""], [[1.0 if i >= 10 else 0.0] for i in range(n)]),
        "amp_scale": _series("amp_scale", [""], [[max(65536.0 / 2 ** max(0, i - 9), 2.0**-10)] for i in range(n)]),
    }
    found, _ = analyze(s)
    (f,) = [f for f in found if f.kind == "nonfinite"]
    assert f.first_step > 100  # only once the scale fell below 1


def test_vanishing_is_relative_to_the_other_layers_and_own_history():
    n = 40
    g = np.ones((n, 3))
    g[:, 0] = 1e-5  # tiny compared with the other layers from the start
    g[20:, 1] = 1e-4 * g[20:, 1]  # collapses 1e4x at step 200
    s = {"grad_norm": _series("grad_norm", ["a.weight", "b.weight", "c.weight"], g)}
    (f,) = [f for f in analyze(s)[0] if f.kind == "vanishing_gradient"]
    assert f.severity == "warning" and f.layers == ["a.weight", "b.weight"] and f.first_step == 0
    # Uniformly small gradients (a loss near its minimum) are not vanishing.
    s = {"grad_norm": _series("grad_norm", ["a.weight", "b.weight"], np.full((n, 2), 1e-9))}
    assert "vanishing_gradient" not in _kinds(s)


def test_zero_bias_gradient_next_to_a_live_weight_is_info():
    g = np.ones((20, 2))
    g[:, 1] = 1e-9  # conv bias before BatchNorm, or a key-projection bias under softmax
    kinds = _kinds({"grad_norm": _series("grad_norm", ["k.weight", "k.bias"], g)})
    assert kinds == {"vanishing_gradient": "info"}


def test_exploding_from_growth_and_from_size():
    n = 30
    total = np.concatenate([np.full(20, 0.5), 0.5 * 10.0 ** np.arange(1, 11)])
    s = {
        "grad_norm": _series("grad_norm", ["w"], total[:, None]),
        "grad_norm_total": _series("grad_norm_total", [""], total[:, None]),
    }
    (f,) = [f for f in analyze(s)[0] if f.kind == "exploding_gradient"]
    assert f.first_step == 210 and f.severity == "warning"
    s = {
        "grad_norm": _series("grad_norm", ["w.weight", "w.bias"], np.tile([[5e6, 5e6]], (n, 1))),
        "weight_norm": _series("weight_norm", ["w.weight", "w.bias"], np.tile([[10.0, 0.0]], (n, 1))),
    }
    (f,) = [f for f in analyze(s)[0] if f.kind == "exploding_gradient"]
    assert f.layers == ["w.weight"]  # a zero-initialised bias is never compared with its own size


def test_noisy_healthy_loss_has_no_spike():
    rng = np.random.default_rng(0)
    n = 400
    trend = 2.0 * np.exp(-np.arange(n) / 80) + 0.05
    loss = trend * rng.lognormal(0.0, 0.5, n)  # heavy-tailed minibatch noise
    kinds = _kinds({"loss": _series("loss", ["total"], loss[:, None])})
    assert "loss_spike" not in kinds and "loss_not_decreasing" not in kinds


def test_loss_spike_must_come_back():
    base = np.linspace(2.0, 0.5, 60)
    spike = base.copy()
    spike[40] = 6.0
    (f,) = [f for f in analyze({"loss": _series("loss", ["total"], spike[:, None])})[0] if f.kind == "loss_spike"]
    assert (f.first_step, f.last_step, f.layers) == (400, 400, ["total"])
    diverge = base.copy()
    diverge[40:] = 6.0 * 1.5 ** np.arange(20)  # a jump that stays is divergence
    assert "loss_spike" not in _kinds({"loss": _series("loss", ["total"], diverge[:, None])})


def test_dominance_needs_a_regulariser_over_an_unlearned_data_term():
    n = 30
    ce = np.full(n, 1.38)
    l2 = np.linspace(60.0, 20.0, n)
    s = {"loss": _series("loss", ["ce", "l2"], np.stack([ce, l2], 1))}
    (f,) = [f for f in analyze(s)[0] if f.kind == "loss_component_dominance"]
    assert f.severity == "warning" and f.layers == ["l2", "ce"]
    # A data term fitted to ~0 under a weight-decay term larger than it: normal.
    fitted = np.geomspace(1.38, 1e-4, n)
    s = {"loss": _series("loss", ["ce", "l2"], np.stack([fitted, np.full(n, 0.05)], 1))}
    assert "loss_component_dominance" not in _kinds(s)
    # Names that say nothing: info, with the numbers.
    s = {"loss": _series("loss", ["a", "b"], np.stack([l2, ce], 1))}
    assert _kinds(s)["loss_component_dominance"] == "info"


def test_update_ratio_too_small_ignores_tensors_without_gradient():
    n = 20
    s = {
        "update_ratio": _series("update_ratio", ["a.weight", "b.weight"], np.zeros((n, 2))),
        "grad_norm": _series("grad_norm", ["a.weight", "b.weight"], np.zeros((n, 2))),
        "weight_norm": _series("weight_norm", ["a.weight", "b.weight"], np.ones((n, 2))),
    }
    assert "update_ratio" not in _kinds(s)  # dead or unused: no gradient, so no update whatever the lr
    s["grad_norm"] = _series("grad_norm", ["a.weight", "b.weight"], np.ones((n, 2)))
    assert _kinds(s)["update_ratio"] == "warning"  # gradients, but the weights do not move: lr 0


def test_findings_module_imports_without_torch():
    code = (
        "import sys; import tb_diag_plugin.findings, tb_diag_plugin.report; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- report
def test_report_text_lists_runs_worst_first_with_skipped_rules(suite):
    out = io.StringIO()
    status = report.run(suite[0], as_json=False, fail_on=None, out=out)
    text = out.getvalue()
    assert status == 0
    for name in CASES:
        assert f"== {name}:" in text
    block = text.split("== vanishing_sigmoid:")[1].split("\n== ")[0]
    assert "ERROR   vanishing_gradient" in block and "Try: " in block
    assert "not checked" in block and "dead_relu" in block
    assert text.rstrip().endswith(".") and "run(s):" in text


def test_report_exit_status_follows_fail_on(suite, tmp_path):
    assert report.run(suite[0], False, "error", io.StringIO()) == 1
    healthy = tmp_path / "healthy"
    for name in HEALTHY:
        shutil.copytree(os.path.join(suite[0], name), healthy / name)
    assert report.run(str(healthy), False, "warning", io.StringIO()) == 0
    assert report.run(str(healthy), False, "info", io.StringIO()) == 1  # the CNN's redundant conv biases
    with pytest.raises(ValueError):
        report.run(str(healthy), False, "fatal", io.StringIO())


def test_report_json_is_a_list_of_design_objects(suite, capsys):
    out = io.StringIO()
    report.run(suite[0], as_json=True, fail_on=None, out=out)
    doc = json.loads(out.getvalue())
    assert isinstance(doc, list) and doc
    # loss_spike adds the steps of its spikes (the tab marks them); nothing else adds a key
    assert all(set(d) == DESIGN_KEYS | ({"steps"} if d["kind"] == "loss_spike" else set()) for d in doc)
    assert {d["run"] for d in doc} >= set(BROKEN)
    assert "not checked" in capsys.readouterr().err  # notes stay off stdout


def test_cli_report(suite):
    proc = subprocess.run(
        [sys.executable, "-m", "tb_diag_plugin", "report", suite[0], "--json", "--fail-on", "error"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    kinds = {d["kind"] for d in json.loads(proc.stdout)}
    # No labelled run grows its logits without bound, and the suite's loops are wired right;
    # tests/test_findings_field.py and tests/test_findings_causes.py check those rules on hand-built series.
    wiring = {"not_in_optimizer", "grad_not_reset", "module_mode", "lr_collapsed", "output_loss_mismatch"}
    assert kinds >= set(findings.KINDS) - {"logit_growth"} - wiring


def test_l2_term_does_not_hide_vanishing_gradients():
    # The README's loop adds 1e-4 * sum(p**2): every weight then gets 2e-4 * w even where the data
    # gradient is gone, and the early layers of a deep sigmoid net look only 1e-3 below the last.
    n, lam = 30, 1e-4
    w = np.full((n, 10), 4.0)
    data = np.concatenate([np.full((n, 7), 1e-9), np.tile([[1e-3, 3e-2, 0.3]], (n, 1))], 1)
    g = np.sqrt(data**2 + (2 * lam * w) ** 2)
    names = [f"{i}.weight" for i in range(10)]
    s = {"grad_norm": _series("grad_norm", names, g), "weight_norm": _series("weight_norm", names, w)}
    (f,) = [f for f in analyze(s)[0] if f.kind == "vanishing_gradient"]
    assert f.layers[:7] == names[:7] and "9.weight" not in f.layers and "L2 term" in f.message
    # Every tensor on the floor: the regulariser swamps the data everywhere; not one layer starving.
    s["grad_norm"] = _series("grad_norm", names, 2 * lam * w * (1 + 1e-3 * np.arange(10)))
    assert "vanishing_gradient" not in _kinds(s)


def test_a_stuck_data_term_under_a_shrinking_regulariser_is_not_decreasing():
    n = 40
    ce = np.full(n, 1.386)
    reg = np.linspace(1.0, 0.1, n)  # the total falls 40 %, all of it from the regulariser
    s = {"loss": _series("loss", ["total", "ce", "l2"], np.stack([ce + reg, ce, reg], 1))}
    (f,) = [f for f in analyze(s)[0] if f.kind == "loss_not_decreasing"]
    assert f.layers == ["ce"]
