"""Findings for the failures transformer training really has (issue 15), on hand-built series:
divergence, runaway and decay-pinned weights, parameters without gradient, clipping on most
steps, logit growth, Adam's eps, over- and underfitting; severity that matches harm; causes
before symptoms; advice chosen from the model's own structure."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from test_findings_causes import HEADLINES

import pathologies
from tb_diag_plugin import report
from tb_diag_plugin.findings import KINDS, ModelInfo, Thresholds, analyze
from tb_diag_plugin.findings.model_info import read_model
from tb_diag_plugin.findings.series import Series
from tbserver import serve


def _series(metric, layers, values, steps=None):
    v = np.asarray(values, dtype=np.float32)
    if v.ndim == 1:
        v = v[:, None]
    st = np.asarray(steps if steps is not None else np.arange(v.shape[0]) * 10, dtype=np.int64)
    return Series(metric, list(layers), [""] * len(layers), st, v, np.ones(v.shape, dtype=bool))


def _doc(types, sites=(), params=(), optimizer=None):
    """A structure document as logger/structure.py writes it (modules: name, type, params, sites)."""
    mods = []
    for name, typ in types.items():
        mods.append({
            "name": name, "type": typ,
            "params": [p for p in params if p["name"].rsplit(".", 1)[0] == name],
            "sites": [{"name": s, "type": t, "kind": k} for s, t, k, m in sites if m == name],
        })
    doc = {"version": 1, "modules": mods}
    if optimizer is not None:
        doc["optimizer"] = optimizer
    return doc


GPT = ModelInfo.from_structure(_doc(
    {"": "GPT", "tok": "Embedding", "blocks.0.ln_1": "LayerNorm", "blocks.0.attn": "MultiheadAttention",
     "blocks.0.mlp.1": "GELU", "ln_f": "LayerNorm", "head": "Linear"},
    sites=[("blocks.0.mlp.1", "GELU", "other", "blocks.0.mlp.1")],
    optimizer={"class": "AdamW", "groups": [{"lr": 3e-3, "weight_decay": 0.1, "eps": 1e-8, "betas": [0.9, 0.95],
                                             "params": ["tok.weight", "head.weight"]}]},
))
SIGMOID_MLP = ModelInfo.from_structure(_doc(
    {"": "Sequential", "0": "Linear", "1": "Sigmoid", "2": "Linear", "3": "Sigmoid", "4": "Linear"},
    sites=[("1", "Sigmoid", "sigmoid", "1"), ("3", "Sigmoid", "sigmoid", "3")],
    optimizer={"class": "SGD", "groups": [{"lr": 0.1, "weight_decay": 0.0, "momentum": 0.0, "params": []}]},
))
RELU_MLP = ModelInfo.from_structure(_doc(
    {"": "Sequential", "0": "Linear", "1": "ReLU", "2": "Linear", "3": "Dropout", "4": "Linear"},
    sites=[("1", "ReLU", "relu", "1")],
    optimizer={"class": "SGD", "groups": [{"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "params": []}]},
))


def _found(series, model=None, **th):
    return analyze(series, Thresholds(**th) if th else None, model=model)[0]


def _one(found, kind):
    (f,) = [f for f in found if f.kind == kind]
    assert f.message.startswith(HEADLINES[kind]), f.message  # the problem in plain words, first
    return f


# ---------------------------------------------------------------- contract
def test_new_kinds_are_in_the_contract():
    for kind in ("loss_diverged", "overfitting", "underfitting", "no_gradient", "weight_norm_growth",
                 "weight_decay_equilibrium", "gradient_clipping", "logit_growth", "adam_eps"):
        assert kind in KINDS


def test_model_info_from_old_and_new_documents():
    old = ModelInfo.from_structure({"version": 1, "modules": [
        {"name": "", "type": "Net", "params": [{"name": "w", "shape": [2], "numel": 2, "tracked": True}],
         "sites": []}]})
    assert old.known and old.optimizer is None and old.groups == () and not old.frozen("w") and old.held("w") is None
    new = ModelInfo.from_structure(_doc(
        {"": "Net", "enc": "Linear", "head": "Linear"},
        params=[{"name": "enc.weight", "requires_grad": False, "in_optimizer": False},
                {"name": "head.weight", "requires_grad": True, "in_optimizer": True}],
        optimizer={"class": "AdamW", "groups": [{"lr": 1e-2, "weight_decay": 30.0, "eps": 1e-8,
                                                 "betas": [0.9, 0.999], "params": ["head.weight"]}]}))
    assert new.frozen("enc.weight") and not new.frozen("head.weight") and new.held("head.weight") is True
    assert new.adam_family and new.hyper("eps") == [1e-8]
    assert new.decay_products() == [(pytest.approx(0.3), 1e-2, 30.0)]
    assert not ModelInfo.from_structure(None).known
    with pytest.raises(TypeError, match="doc"):
        ModelInfo.from_structure(["not", "a", "document"])
    with pytest.raises(TypeError, match="model"):
        analyze({}, model={"modules": []})


def test_an_unreadable_structure_costs_only_the_advice():
    def broken():
        raise ValueError("structure document is malformed")

    model, notes = read_model(broken)
    assert not model.known and len(notes) == 1 and "malformed" in notes[0]


# ---------------------------------------------------------------- loss_diverged
def _diverging(n=60, onset=10, level=50.0, start=3.6, seed=0):
    rng = np.random.default_rng(seed)
    v = np.linspace(start, start * 0.9, n)
    v[onset:] = level * rng.lognormal(0.0, 0.4, n - onset)
    return v


def test_loss_that_rises_tens_of_times_and_stays_is_an_error_with_its_onset():
    v = _diverging()
    f = _one(_found({"loss": _series("loss", ["total"], v)}), "loss_diverged")
    assert f.severity == "error" and f.first_step == 100 and f.layers == ["total"]
    assert "step 100" in f.message and f"to {np.median(v[10:].astype(np.float32)):.3g}" in f.message


def test_moderate_divergence_is_a_warning_and_a_spike_is_not_divergence():
    v = _diverging(level=3.6 * 3.5)
    v2 = np.where(np.arange(v.size) >= 10, 3.6 * 3.5, v)  # 3.5x and flat
    assert _one(_found({"loss": _series("loss", ["total"], v2)}), "loss_diverged").severity == "warning"
    spike = np.linspace(3.6, 1.0, 60)
    spike[30:33] = 40.0  # comes back
    assert "loss_diverged" not in {f.kind for f in _found({"loss": _series("loss", ["total"], spike)})}


def test_nan_is_nonfinite_not_divergence():
    v = _diverging()
    v[40:] = np.nan
    kinds = {f.kind for f in _found({"loss": _series("loss", ["total"], v)})}
    assert "nonfinite" in kinds and "loss_diverged" not in kinds


# ---------------------------------------------------------------- weight_norm_growth
def test_weights_100x_in_ten_steps_is_an_error_10x_a_warning():
    n = 30
    w = np.ones((n, 3))
    w[:, 0] = np.concatenate([np.ones(10), np.full(n - 10, 150.0)])  # 150x between steps 90 and 100
    w[:, 1] = np.linspace(1.0, 1.5, n)
    w[:, 2] = 5.0
    names = ["a.weight", "b.weight", "c.weight"]
    f = _one(_found({"weight_norm": _series("weight_norm", names, w)}), "weight_norm_growth")
    assert f.severity == "error" and f.layers == ["a.weight"] and f.first_step == 100
    assert "within 10 steps" in f.message
    w[10:, 0] = 12.0
    assert _one(_found({"weight_norm": _series("weight_norm", names, w)}), "weight_norm_growth").severity == "warning"


def test_a_tiny_initialisation_growing_is_not_runaway():
    n = 30
    w = np.full((n, 3), 5.0)
    w[:, 0] = np.linspace(0.01, 0.2, n)  # a near-zero residual projection learning: 20x its start
    found = _found({"weight_norm": _series("weight_norm", ["p.weight", "q.weight", "r.weight"], w)})
    assert "weight_norm_growth" not in {f.kind for f in found}


# ---------------------------------------------------------------- weight_decay_equilibrium
def _pinned_run(n=40):
    names = ["0.weight", "2.weight", "4.weight"]
    w = np.outer(np.concatenate([np.geomspace(1.0, 0.25, 6), np.full(n - 6, 0.25)]), [8.0, 6.0, 2.0])
    u = np.full((n, 3), 0.02)
    u[0] = 0.3
    u[1:4] = 0.2  # the first steps shrink the weights fast
    loss = np.full(n, 1.37)
    return names, {"weight_norm": _series("weight_norm", names, w),
                   "update_ratio": _series("update_ratio", names, u),
                   "loss": _series("loss", ["total"], loss)}


def _model_with(lr, wd, cls="AdamW"):
    return ModelInfo.from_structure(_doc({"": "Net"}, optimizer={"class": cls, "groups": [
        {"lr": lr, "weight_decay": wd, "eps": 1e-8, "params": []}]}))


def test_weight_decay_far_above_the_usual_range_is_named_with_its_numbers():
    names, s = _pinned_run()
    found = _found(s, model=_model_with(1e-2, 30.0))
    f = found[0]
    assert f.kind == "weight_decay_equilibrium" and f.severity == "warning"
    assert "0.3" in f.message and "30" in f.message
    # The updates look large next to the pinned weights and the loss stands still: consequences, folded.
    others = [g for g in found if g.kind in ("update_ratio", "loss_not_decreasing")]
    assert others and all(g.severity == "info" and "weight_decay_equilibrium" in g.message for g in others)


def test_decay_pinned_by_a_huge_learning_rate_blames_the_learning_rate_not_a_usual_decay():
    _, s = _pinned_run()
    by_decay = _found(s, model=_model_with(1e-2, 30.0))[0]
    by_lr = _found(s, model=_model_with(1.0, 0.1))[0]
    assert by_decay.kind == by_lr.kind == "weight_decay_equilibrium"
    assert "Lower weight_decay" in by_decay.suggestion and "learning rate" not in by_decay.suggestion
    assert "learning rate (1) is too high" in by_lr.suggestion and "Lower weight_decay" not in by_lr.suggestion


def test_usual_weight_decay_is_not_flagged():
    _, s = _pinned_run()
    assert "weight_decay_equilibrium" not in {f.kind for f in _found(s, model=_model_with(1e-3, 0.1))}


# ---------------------------------------------------------------- no_gradient
def _no_grad_series(n=20):
    names = ["enc.weight", "enc.bias", "head.weight", "head.bias"]
    missing = np.zeros((n, 4))
    missing[:, :2] = 1.0
    g = np.ones((n, 4))
    return names, {"grad_missing": _series("grad_missing", names, missing),
                   "grad_norm": _series("grad_norm", names, g),
                   "weight_norm": _series("weight_norm", names, np.ones((n, 4)))}


def _holding(held: dict):
    return ModelInfo.from_structure(_doc(
        {"": "Net", "enc": "Linear", "head": "Linear"},
        params=[{"name": n, "requires_grad": rg, "in_optimizer": io} for n, (rg, io) in held.items()],
        optimizer={"class": "Adam", "groups": [{"lr": 1e-3, "params": [n for n, (_, io) in held.items() if io]}]}))


def test_parameters_the_optimizer_holds_without_gradient_are_named():
    names, s = _no_grad_series()
    model = _holding({n: (True, True) for n in names})
    f = _one(_found(s, model=model), "no_gradient")
    assert f.severity == "warning" and f.layers == ["enc.weight", "enc.bias"] and "detach" in f.suggestion


def test_frozen_on_purpose_is_not_flagged():
    names, s = _no_grad_series()
    for enc in ((False, False), (False, None), (True, False)):  # requires_grad False, or in no group
        model = _holding({"enc.weight": enc, "enc.bias": enc, "head.weight": (True, True), "head.bias": (True, True)})
        assert "no_gradient" not in {f.kind for f in _found(s, model=model)}, enc
    # Nothing known about who holds them: said, but only as info.
    assert _one(_found(s), "no_gradient").severity == "info"


# ---------------------------------------------------------------- gradient_clipping
def test_clipping_on_most_steps_quotes_the_pre_clip_90th_percentile():
    rng = np.random.default_rng(0)
    n = 50
    pre = rng.uniform(2.0, 6.0, n)
    post = np.minimum(pre, 1.0)
    s = {"grad_norm_preclip": _series("grad_norm_preclip", [""], pre),
         "grad_norm_total": _series("grad_norm_total", [""], post)}
    f = _one(_found(s, model=GPT), "gradient_clipping")
    xs = sorted(pre.astype(np.float32).tolist())
    k = 0.9 * (n - 1)
    p90 = xs[int(k)] + (xs[int(k) + 1] - xs[int(k)]) * (k - int(k))  # linear interpolation, by hand
    assert f.severity == "warning" and f"{p90:.3g}" in f.suggestion and "0.003" in f.suggestion
    post = np.where(np.arange(n) % 4 == 0, 1.0, pre)  # a quarter of the steps: clipping catches outliers
    s["grad_norm_total"] = _series("grad_norm_total", [""], np.minimum(post, pre))
    assert "gradient_clipping" not in {f.kind for f in _found(s)}


# ---------------------------------------------------------------- logit_growth / adam_eps
def test_logit_growth_advice_fits_the_model():
    v = np.geomspace(2.0, 400.0, 40)
    s = {"logit_max_abs": _series("logit_max_abs", ["head"], v)}
    f = _one(_found(s, model=GPT), "logit_growth")
    assert f.layers == ["head"] and "z-loss" in f.suggestion
    assert "z-loss" not in _one(_found(s, model=RELU_MLP), "logit_growth").suggestion
    healthy = {"logit_max_abs": _series("logit_max_abs", ["head"], np.linspace(2.0, 18.0, 40))}
    assert "logit_growth" not in {f.kind for f in _found(healthy)}


def test_adam_eps_swamping_weights_that_get_gradients():
    n = 20
    names = ["a.weight", "a.bias", "b.weight"]
    frac = np.zeros((n, 3))
    frac[:, 0] = 0.9
    frac[:, 1] = 1.0  # a bias with no gradient by construction
    frac[:, 2] = 1.0  # no gradient at all: no_gradient's business
    g = np.ones((n, 3))
    g[:, 2] = 0.0
    s = {"adam_eps_fraction": _series("adam_eps_fraction", names, frac), "grad_norm": _series("grad_norm", names, g)}
    model = _model_with(1e-3, 0.0, cls="Adam")
    f = _one(_found(s, model=model), "adam_eps")
    assert f.layers == ["a.weight"] and "1e-08" in f.message.replace("1.0e-08", "1e-08")


# ---------------------------------------------------------------- overfitting / underfitting
def test_overfitting_names_the_best_step_and_where_the_gap_opened():
    train_steps = np.arange(0, 200, 2)
    train = 1.4 * np.exp(-train_steps / 40) + 0.01
    val_steps = np.arange(9, 200, 10)
    val = np.array([1.3, 1.0, 0.9, 0.88, 0.95, 1.05, 1.2, 1.35, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2, 2.3, 2.4,
                    2.5, 2.6])
    s = {"loss": _series("loss", ["total"], train, train_steps), "val_loss": _series("val_loss", ["total"], val,
                                                                                      val_steps)}
    f = _one(_found(s, model=RELU_MLP), "overfitting")
    best = int(val_steps[int(np.argmin(val))])
    assert f.severity == "warning" and best == 39 and "step 39" in f.message and "step 39" in f.suggestion
    assert val_steps[0] < f.first_step <= best + 20
    assert "dropout" not in f.suggestion  # the model has Dropout already
    assert "dropout" in _one(_found(s, model=GPT), "overfitting").suggestion
    # Validation rising with the training loss: divergence, not overfitting.
    s["loss"] = _series("loss", ["total"], np.linspace(1.4, 3.0, train_steps.size), train_steps)
    assert "overfitting" not in {f.kind for f in _found(s)}


def test_underfitting_when_both_losses_sit_high_and_flat():
    steps = np.arange(0, 200, 2)
    train = np.concatenate([np.linspace(1.38, 1.0, 30), np.full(70, 1.0)])
    s = {"loss": _series("loss", ["total"], train, steps),
         "val_loss": _series("val_loss", ["total"], np.full(10, 1.02), np.arange(19, 200, 20))}
    f = _one(_found(s, model=RELU_MLP), "underfitting")
    assert f.severity == "warning" and "capacity" in f.suggestion and "0.1" in f.suggestion
    s["val_loss"] = _series("val_loss", ["total"], np.full(10, 2.0), np.arange(19, 200, 20))
    assert "underfitting" not in {f.kind for f in _found(s)}


# ---------------------------------------------------------------- causes before symptoms
def test_the_first_line_is_the_cause_small_layernorm_gradients_fold_below_it():
    n = 60
    names = ["tok.weight", "blocks.0.ln_1.weight", "head.weight"]
    g = np.ones((n, 3))
    g[10:, 1] = 1e-6  # LayerNorm gain next to a blown-up embedding
    s = {"loss": _series("loss", ["total"], _diverging()), "grad_norm": _series("grad_norm", names, g)}
    found = _found(s, model=GPT)
    assert found[0].kind == "loss_diverged" and found[0].severity == "error"
    v = _one(found, "vanishing_gradient")
    assert v.severity == "info" and v.message.startswith("Vanishing gradients: ")
    assert "Probably a consequence of loss diverged (the loss_diverged finding, from step 100)." in v.message


# ---------------------------------------------------------------- advice fits the model
def _vanishing_series():
    g = np.ones((30, 3))
    g[:, 0] = 1e-6
    return {"grad_norm": _series("grad_norm", ["0.weight", "2.weight", "4.weight"], g)}


def _exploding_series():
    total = np.concatenate([np.full(20, 0.5), 0.5 * 10.0 ** np.arange(1, 11)])
    return {"grad_norm": _series("grad_norm", ["w"], total), "grad_norm_total": _series("grad_norm_total", [""], total)}


def _dead_series():
    return {"dead_fraction": _series("dead_fraction", ["1"], np.full(30, 0.8))}


def _saturated_series():
    return {"saturation": _series("saturation", ["1"], np.full(30, 0.6))}


def _update_series():
    names = ["0.weight", "2.weight"]
    return {"update_ratio": _series("update_ratio", names, np.full((30, 2), 0.5)),
            "weight_norm": _series("weight_norm", names, np.ones((30, 2)))}


@pytest.mark.parametrize("kind, series, transformer_has, mlp_has", [
    ("vanishing_gradient", _vanishing_series, "already normalises", "sigmoid"),
    ("exploding_gradient", _exploding_series, "warm-up", "xavier"),
    ("dead_relu", _dead_series, "LeakyReLU", "normalisation before the ReLU"),
    ("saturated_activation", _saturated_series, "xavier", "normalisation before the activation"),
    ("update_ratio", _update_series, "AdamW usually runs at", "momentum"),
    ("loss_diverged", lambda: {"loss": _series("loss", ["total"], _diverging())}, "warm-up", "normalisation"),
])
def test_advice_differs_by_architecture(kind, series, transformer_has, mlp_has):
    mlp = RELU_MLP if kind == "dead_relu" else SIGMOID_MLP
    a = _one(_found(series(), model=GPT), kind).suggestion
    b = _one(_found(series(), model=mlp), kind).suggestion
    assert a != b and transformer_has in a and mlp_has in b
    assert "sigmoid" not in a.lower() and "add normalisation" not in a.lower()  # GELU + LayerNorm only


# ---------------------------------------------------------------- the callers pass the model
def test_route_and_report_tell_a_detached_branch_from_a_frozen_one(tmp_path):
    """The same gradient-less encoder: a warning where the optimizer holds it, nothing where it is frozen.

    Only the structure document tells them apart, so this shows that `/findings` and `tb-diag report`
    read it and hand it to the rules.
    """
    pathologies.train(pathologies.CASES["no_gradient_detached_branch"], str(tmp_path), name="detached")
    pathologies.train(pathologies.CASES["healthy_frozen_backbone"], str(tmp_path), name="frozen")
    out = io.StringIO()
    report.run(str(tmp_path), True, None, out)
    by_run = {}
    for d in json.loads(out.getvalue()):
        by_run.setdefault(d["run"], []).append(d)
    with serve(str(tmp_path)) as srv:
        srv.wait_for_runs(2)
        for run in ("detached", "frozen"):
            routed = srv.plugin(f"findings?run={run}")["findings"]
            assert routed == by_run.get(run, []), run
    (f,) = [d for d in by_run["detached"] if d["kind"] == "no_gradient"]
    assert f["severity"] == "warning" and {"encoder.0.weight", "encoder.2.weight"} <= set(f["layers"])
    assert not [d for d in by_run.get("frozen", []) if d["kind"] == "no_gradient"]
