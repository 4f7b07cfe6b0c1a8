"""Findings that name the cause (issue 22), on hand-built series: the loop's wiring (a parameter in
no optimizer group, gradients never reset, modules in the wrong mode, the learning rate's course,
an output already squashed), gradient spikes, loss jumps, what the NaN rule may claim, causes over
their consequences, and the words: each rule's headline is pinned here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tb_diag_plugin.findings import ModelInfo, Rule, analyze
from tb_diag_plugin.findings.context import Context, fmt, layer_list, natural_key
from tb_diag_plugin.findings.series import Series
from tb_diag_plugin.findings.thresholds import Thresholds

# Each kind's headline: the problem in plain words, first (a rule may have more than one).
HEADLINES = {
    "not_in_optimizer": ("Parameters never updated: ",),
    "grad_not_reset": ("Gradients never reset: ",),
    "module_mode": ("Module in the wrong mode: ",),
    "lr_collapsed": ("Learning rate collapsed: ",),
    "lr_unbounded": ("Learning rate unbounded: ",),
    "lr_zero": ("Learning rate zero: ",),
    "output_loss_mismatch": ("Output already a softmax: ", "Output already a sigmoid: "),
    "nonfinite": ("NaN/Inf: ",),
    "exploding_gradient": ("Exploding gradients: ",),
    "gradient_spike": ("Gradient spikes: ",),
    "vanishing_gradient": ("Vanishing gradients: ", "Bias without effect: "),
    "no_gradient": ("No gradient: ",),
    "gradient_clipping": ("Clipping on most steps: ", "Clipping scaled gradients: "),
    "dead_relu": ("Dead ReLUs: ",),
    "saturated_activation": ("Saturated activations: ", "Confident outputs: "),
    "logit_growth": ("Logits growing: ",),
    "update_ratio": ("Updates too large: ", "Updates too small: "),
    "adam_eps": ("Adam's eps too large: ",),
    "weight_norm_growth": ("Weight norms run away: ",),
    "weight_decay_equilibrium": ("Weight decay dominates: ", "Weights collapse: "),
    "loss_spike": ("Loss spikes: ", "Loss jumped: "),
    "loss_diverged": ("Loss diverged: ",),
    "loss_not_decreasing": ("Loss not decreasing: ",),
    "loss_component_dominance": ("One loss term dominates: ",),
    "overfitting": ("Overfitting: ",),
    "underfitting": ("Underfitting: ",),
    "inputs_not_normalised": ("Inputs not normalised: ",),
}


def _series(metric, layers, values, steps=None):
    v = np.asarray(values, dtype=np.float32)
    if v.ndim == 1:
        v = v[:, None]
    st = np.asarray(steps if steps is not None else np.arange(v.shape[0]) * 10, dtype=np.int64)
    return Series(metric, list(layers), [""] * len(layers), st, v, np.ones(v.shape, dtype=bool))


def _doc(params, held, types=None, optimizer="SGD", lr=0.1, eps=None):
    """A structure document: one module per parameter's prefix, `held` the parameters in the optimizer."""
    mods = {}
    for p in params:
        mods.setdefault(p.rsplit(".", 1)[0], []).append(
            {"name": p, "requires_grad": True, "in_optimizer": p in held})
    group = {"lr": lr, "params": list(held)}
    if eps is not None:
        group["eps"] = eps
    return ModelInfo.from_structure({
        "version": 1,
        "modules": [{"name": m, "type": (types or {}).get(m, "Linear"), "params": ps, "sites": []}
                    for m, ps in mods.items()],
        "optimizer": {"class": optimizer, "groups": [group]},
    })


def _one(found, kind):
    hits = [f for f in found if f.kind == kind]
    assert len(hits) == 1, [(f.kind, f.severity, f.message) for f in found]
    assert hits[0].message.startswith(HEADLINES[kind]), hits[0].message
    return hits[0]


def _kinds(found):
    return {f.kind: f.severity for f in found}


# ---------------------------------------------------------------- not_in_optimizer
def test_a_replaced_head_in_no_optimizer_group_is_the_cause_not_exploding_gradients():
    names = ["fc1.weight", "fc2.weight"]
    g = np.ones((40, 2))
    g[20:, 1] = 500.0  # the head's gradient, never applied, grows
    s = {"grad_norm": _series("grad_norm", names, g),
         "grad_norm_total": _series("grad_norm_total", [""], np.sqrt((g ** 2).sum(1))),
         "optimizer_orphans": _series("optimizer_orphans", [""], np.full(40, 2.0))}
    found, _ = analyze(s, model=_doc(names, held=["fc1.weight"]))
    f = _one(found, "not_in_optimizer")
    assert f.severity == "error" and f.layers == ["fc2.weight"] and found[0] is f
    assert f.message.startswith("Parameters never updated: 1 tensor(s) ('fc2.weight')")
    assert "2 tensor(s) the model no longer uses" in f.message
    assert "Build the optimizer after replacing the module" in f.suggestion
    e = _one(found, "exploding_gradient")
    assert e.severity == "info" and "the not_in_optimizer finding" in e.message


def test_a_backbone_left_out_of_the_optimizer_on_purpose_is_info():
    names = ["backbone.weight", "head.weight"]
    s = {"grad_norm": _series("grad_norm", names, np.ones((30, 2)))}
    f = _one(analyze(s, model=_doc(names, held=["head.weight"]))[0], "not_in_optimizer")
    assert f.severity == "info" and f.layers == ["backbone.weight"] and "requires_grad_(False)" in f.suggestion
    # Every parameter held: nothing.
    assert "not_in_optimizer" not in _kinds(analyze(s, model=_doc(names, held=names))[0])


# ---------------------------------------------------------------- grad_not_reset
def test_gradients_never_reset_name_zero_grad_and_outrank_the_growth():
    n = 40
    total = 0.5 * np.arange(1, n + 1) ** 1.5  # summed gradients grow with the step count
    s = {"grad_carried": _series("grad_carried", [""], np.ones(n)),
         "grad_norm_total": _series("grad_norm_total", [""], total),
         "grad_norm": _series("grad_norm", ["w"], total)}
    found, _ = analyze(s)
    f = _one(found, "grad_not_reset")
    assert f.severity == "error" and found[0] is f
    assert f.message.startswith("Gradients never reset: on 40 of 40 logged steps")
    assert "optimizer.zero_grad()" in f.suggestion and "accumulation" in f.suggestion
    assert _kinds(found).get("exploding_gradient") == "info"
    # Reset on every step (accumulation included: the logger reports 0): nothing.
    s["grad_carried"] = _series("grad_carried", [""], np.zeros(n))
    assert "grad_not_reset" not in _kinds(analyze(s)[0])


# ---------------------------------------------------------------- module_mode
def test_modules_in_eval_mode_while_training_are_named_with_model_train():
    n = 30
    s = {"eval_in_train": _series("eval_in_train", ["bn1", "drop", "bn2"], np.tile([1.0, 1.0, 0.0], (n, 1)))}
    f = _one(analyze(s)[0], "module_mode")
    assert f.severity == "warning" and f.layers == ["bn1", "drop"]
    assert f.message.startswith("Module in the wrong mode: 'bn1', 'drop'") and "eval mode during training" in f.message
    assert "model.train()" in f.suggestion


def test_training_mode_during_evaluation_needs_two_evaluations():
    v = np.zeros((30, 1))
    v[[9, 19]] = 1.0
    f = _one(analyze({"train_in_eval": _series("train_in_eval", ["bn"], v)})[0], "module_mode")
    assert "training mode during evaluation" in f.message and "model.eval()" in f.suggestion
    v[19] = 0.0  # one odd no_grad forward in training mode (an EMA teacher, a probe) is no habit
    assert "module_mode" not in _kinds(analyze({"train_in_eval": _series("train_in_eval", ["bn"], v)})[0])


# ---------------------------------------------------------------- the learning rate's course
def _lr(values):
    return {"learning_rate": _series("learning_rate", [""], values)}


def test_a_per_epoch_scheduler_stepped_per_batch_collapses_the_learning_rate():
    n = 100
    lr = 0.1 * 0.5 ** np.arange(n)  # StepLR(step_size=1, gamma=0.5) stepped every batch
    loss = np.r_[np.linspace(2.3, 2.1, 5), np.full(n - 5, 2.1)]
    found, _ = analyze({**_lr(lr), "loss": _series("loss", ["total"], loss)})
    f = _one(found, "lr_collapsed")
    assert f.severity == "error" and f.message.startswith("Learning rate collapsed: it fell from 0.1 at step 0")
    assert "the loss has barely moved since" in f.message and "once per epoch" in f.suggestion
    assert _kinds(found).get("loss_not_decreasing", "info") == "info"


@pytest.mark.parametrize("lr", [
    0.1 * 0.5 * (1 + np.cos(np.pi * np.arange(200) / 199)),  # cosine to exactly 0 at the end
    0.1 * 0.1 ** (np.arange(200) // 67),  # StepLR(67, 0.1): 1e-3 of the peak only in the last third
    np.r_[np.linspace(1e-6, 3e-3, 20), np.full(180, 3e-3)],  # linear warm-up, then constant
    np.linspace(1e-7, 1e-3, 50),  # a warm-up that lasts the whole (short) run
])
def test_usual_schedules_are_not_flagged(lr):
    kinds = _kinds(analyze(_lr(lr))[0])
    assert not {"lr_collapsed", "lr_unbounded", "lr_zero"} & set(kinds), kinds


def test_a_schedule_that_climbs_exponentially_is_unbounded():
    lr = 0.01 * 1.2 ** np.arange(60)
    f = _one(analyze(_lr(lr))[0], "lr_unbounded")
    assert f.severity == "error" and f.message.startswith("Learning rate unbounded: it climbs exponentially, from 0.01")


def test_a_zero_learning_rate_is_an_error():
    f = _one(analyze(_lr(np.zeros(30)))[0], "lr_zero")
    assert f.severity == "error" and f.message.startswith("Learning rate zero: it is 0 on most logged steps")


# ---------------------------------------------------------------- output_loss_mismatch
def _squashed(loss_level, rows=True):
    n = 30
    lse = math.log(9 + math.e)  # ten classes, one near-certain: logsumexp of a probability row
    s = {"logit_min": _series("logit_min", ["fc2"], np.full(n, 1e-4)),
         "logit_max": _series("logit_max", ["fc2"], np.full(n, 0.97)),
         "logit_rowsum_dev": _series("logit_rowsum_dev", ["fc2"], np.full(n, 2e-7 if rows else 0.6)),
         "logit_lse": _series("logit_lse", ["fc2"], np.full(n, lse)),
         "loss": _series("loss", ["total"], np.full(n, loss_level))}
    return s


def test_softmax_outputs_fed_to_a_loss_that_applies_its_own_softmax():
    f = _one(analyze(_squashed(1.6))[0], "output_loss_mismatch")
    assert f.severity == "warning" and f.layers == ["fc2"]
    assert f.message.startswith("Output already a softmax: outputs of 'fc2' lie in [0, 1] and each row sums to 1")
    assert "CrossEntropyLoss" in f.suggestion and "raw logits" in f.suggestion


def test_squashed_outputs_with_a_loss_below_the_double_squash_floor_are_fine():
    # log(p) + NLLLoss reaches a loss no CrossEntropyLoss over probabilities can: the pairing is right.
    assert "output_loss_mismatch" not in _kinds(analyze(_squashed(0.2))[0])
    f = _one(analyze(_squashed(0.6, rows=False))[0], "output_loss_mismatch")
    assert f.severity == "warning"
    assert f.message.startswith("Output already a sigmoid:") and "BCEWithLogitsLoss" in f.suggestion
    # Between the floors (0.313 to 0.5) BCELoss on a sigmoid fits as well: a note only.
    assert _one(analyze(_squashed(0.4, rows=False))[0], "output_loss_mismatch").severity == "info"
    assert "output_loss_mismatch" not in _kinds(analyze(_squashed(0.1, rows=False))[0])  # BCELoss on sigmoid


# ---------------------------------------------------------------- gradient_spike
def _noisy(n, seed, spikes_every=None, size=(5.0, 10.0)):
    rng = np.random.default_rng(seed)
    v = 1.0 * rng.lognormal(0.0, 0.15, n)
    if spikes_every:
        at = np.arange(spikes_every, n, spikes_every)
        v[at] *= rng.uniform(*size, at.size)
    return v


_LSTM_DOC = {"version": 1, "modules": [
    {"name": "", "type": "Net", "params": [], "sites": []},
    {"name": "rnn", "type": "LSTM", "params": [{"name": "rnn.weight_hh_l0"}], "sites": []},
    {"name": "fc", "type": "Linear", "params": [{"name": "fc.weight"}], "sites": []}]}
LSTM = ModelInfo.from_structure(_LSTM_DOC)


def test_recurrent_gradient_spikes_name_the_tensor_and_a_clip_threshold():
    n = 300
    tot = _noisy(n, 0, spikes_every=15)
    per = np.stack([tot * 0.9, _noisy(n, 1) * 0.3], axis=1)
    s = {"grad_norm_total": _series("grad_norm_total", [""], tot),
         "grad_norm": _series("grad_norm", ["rnn.weight_hh_l0", "fc.weight"], per)}
    f = _one(analyze(s, model=LSTM)[0], "gradient_spike")
    assert f.severity == "warning" and f.layers[0] == "rnn.weight_hh_l0" and "fc.weight" not in f.layers
    assert f.message.startswith("Gradient spikes: the total gradient norm jumped to between")
    assert "spike score" in f.message
    clip = float(f.suggestion.split("clip_grad_norm_(model.parameters(), ")[1].split(")")[0])
    calm = np.delete(tot, np.arange(15, n, 15))
    assert clip == pytest.approx(np.percentile(calm, 95), rel=0.02)
    assert "recurrent" in f.suggestion


@pytest.mark.parametrize("seed", range(8))
def test_noisy_healthy_gradient_norms_have_no_spike(seed):
    rng = np.random.default_rng(100 + seed)
    n = 400
    trend = 2.0 * np.exp(-np.arange(n) / 150) + 0.3
    tot = trend * rng.lognormal(0.0, 0.35, n)
    per = np.stack([tot * rng.lognormal(0, 0.3, n) for _ in range(6)], axis=1)
    s = {"grad_norm_total": _series("grad_norm_total", [""], tot),
         "grad_norm": _series("grad_norm", [f"{i}.weight" for i in range(6)], per)}
    assert "gradient_spike" not in _kinds(analyze(s)[0])


def test_a_spike_between_logged_steps_is_seen_through_the_between_maximum():
    n = 60
    tot = _noisy(n, 3)
    between = tot * 1.3
    between[[20, 40]] = 50.0  # the spike fell on an unlogged step
    s = {"grad_norm_total": _series("grad_norm_total", [""], tot),
         "grad_norm_max_between": _series("grad_norm_max_between", [""], between)}
    f = _one(analyze(s)[0], "gradient_spike")
    assert f.first_step == 200 and "steps 200, 400" in f.message


def test_one_tensor_spiking_far_above_its_median_is_named_even_when_the_total_hides_it():
    # word_language_model's tanh RNN without clipping: the recurrent weight's gradient at 19.2 against a
    # median of 2.3e-4, while the decoder's large gradient keeps the total norm calm.
    n = 100
    rec = _noisy(n, 4) * 2.3e-4
    rec[60] = 19.2
    dec = _noisy(n, 5) * 1e3
    s = {"grad_norm_total": _series("grad_norm_total", [""], np.sqrt(rec ** 2 + dec ** 2)),
         "grad_norm": _series("grad_norm", ["rnn.weight_hh_l0", "decoder.weight"], np.stack([rec, dec], 1))}
    f = _one(analyze(s, model=LSTM)[0], "gradient_spike")
    assert f.layers == ["rnn.weight_hh_l0"] and f.first_step == 600
    ratio = 19.2 / np.exp(np.median(np.log(rec[40:60])))  # against the median of the 20 logged steps before
    assert f"'rnn.weight_hh_l0' jumped to up to {fmt(ratio)}× their own running median" in f.message


def _early(tot, loss, between=None, preclip=False, updates=False):
    """word_language_model's tanh RNN at lr 20 without clipping, logged every 2 steps (seed 0's values);
    `updates`: with the update ratios and weight norms that run's blow-up threw up."""
    s = {"grad_norm_total": _series("grad_norm_total", [""], tot, steps=np.arange(len(tot)) * 2),
         "loss": _series("loss", ["total"], loss, steps=np.arange(len(loss)) * 2)}
    if updates:
        n = len(tot)
        s["update_ratio"] = _series("update_ratio", _BLOWN, np.r_[_RNN_UPDATES, np.full((n - 5, 2), 2e-3)],
                                    steps=np.arange(n) * 2)
        s["weight_norm"] = _series("weight_norm", _BLOWN, np.r_[_RNN_WEIGHTS, np.tile(_RNN_WEIGHTS[-1], (n - 5, 1))],
                                   steps=np.arange(n) * 2)
    if between is not None:
        s["grad_norm_max_between"] = _series("grad_norm_max_between", [""], between, steps=np.arange(len(tot)) * 2)
    if preclip:
        s["grad_norm_preclip"] = _series("grad_norm_preclip", [""], np.asarray(tot) * 3, steps=np.arange(len(tot)) * 2)
    return s


_RNN_NORMS = [0.613, 2.758, 8.989, 7.841, 16.33, 4.86, 4.894, 2.434] + [3.0] * 42
_RNN_LOSS = [2.776, 6.63, 42.83, 60.61, 44.14, 46.56, 57.95, 55.34] + [45.0] * 42
# Its first five logged update ratios and weight norms of rnn.weight_ih_l0 and decoder.weight (named here
# as the LSTM document's two tensors).
_BLOWN = ["rnn.weight_hh_l0", "fc.weight"]
_RNN_UPDATES = [[2.543, 3.362], [1.508, 1.666], [2.795, 0.8156], [0.238, 0.4039], [0.4992, 0.3888]]
_RNN_WEIGHTS = [[3.245, 2.324], [18.42, 16.38], [37.6, 96.17], [561.8, 112.2], [614.0, 110.4]]


def test_a_recurrent_blow_up_before_any_window_is_a_gradient_spike_with_a_clip_threshold():
    # The first logged norm is the only baseline there is: 2.758 / 0.613 = 4.5x at step 2, and the loss
    # rose from 2.776 (its lowest before) to 60.61 (its highest at steps 2-6).
    found = analyze(_early(_RNN_NORMS, _RNN_LOSS), model=LSTM)[0]
    f = _one(found, "gradient_spike")
    assert f.first_step == 2 and found[0] is f
    assert (f"from {fmt(0.613)} at step 0 to {fmt(2.758)} ({fmt(2.758 / 0.613)}×) at step 2" in f.message
            and f"the loss rose from {fmt(2.776)} to {fmt(60.61)}" in f.message)
    assert "clip_grad_norm_(model.parameters(), 0.613)" in f.suggestion and "recurrent" in f.suggestion
    # The loss it threw up (2.776 -> 45, 16x: an error on its own) folds below it; the spike takes its severity.
    d = _one(found, "loss_diverged")
    assert f.severity == "error" and d.severity == "info"
    assert d.message.endswith("Probably a consequence of gradient spikes (the gradient_spike finding, from step 2).")
    assert d.suggestion.startswith("Fix the gradient_spike finding first. ")


def test_an_early_blow_up_is_the_cause_of_the_updates_weights_and_loss_it_throws_up():
    s = _early(_RNN_NORMS, _RNN_LOSS, updates=True)
    # Without the spike (an MLP: no early spike there) each is an error of its own, from step 2 or 4.
    alone = _kinds(analyze(s)[0])
    assert "gradient_spike" not in alone
    assert {k: alone[k] for k in _THROWN_UP} == dict.fromkeys(_THROWN_UP, "error")
    found = analyze(s, model=LSTM)[0]
    f = _one(found, "gradient_spike")
    assert found[0] is f and f.severity == "error" and f.first_step == 2
    for kind in _THROWN_UP:
        c = _one(found, kind)
        assert c.severity == "info" and c.first_step >= f.first_step, kind
        assert "Probably a consequence of gradient spikes (the gradient_spike finding, from step 2)." in c.message
    # Nothing else is above info: the cause is the one line to read.
    assert [x.kind for x in found if x.severity != "info"] == ["gradient_spike"]


def test_an_early_blow_up_that_is_the_learning_rate_s_keeps_its_own_findings():
    # The same blow-up under AdamW (the step does not follow the gradient's size: gpt_lr_blowup) or with the
    # clip in place: no early spike, and the updates, weights and loss stay errors of their own.
    adam = ModelInfo.from_structure({**_LSTM_DOC, "optimizer": {"class": "AdamW", "groups": [{"lr": 1.0}]}})
    for found in (analyze(_early(_RNN_NORMS, _RNN_LOSS, updates=True), model=adam)[0],
                  analyze(_early(_RNN_NORMS, _RNN_LOSS, preclip=True, updates=True), model=LSTM)[0]):
        assert "gradient_spike" not in _kinds(found)
        for kind in _THROWN_UP:
            c = _one(found, kind)
            assert c.severity == "error" and "Probably a consequence" not in c.message, kind


def test_spikes_found_by_the_rolling_test_are_no_cause_of_too_large_updates():
    # An LSTM at SGD whose gradient norm spikes 5-10x on every 15th logged step from step 150, and whose updates
    # turn too large (0.5 of the weights) from step 1500: spikes within a run are weighed against its own
    # updates, not their cause, so each stays a finding of its own.
    n = 300
    ratio = np.where(np.arange(n)[:, None] < 150, 1e-3, 0.5) * np.ones((1, 2))
    s = {"grad_norm_total": _series("grad_norm_total", [""], _noisy(n, 0, spikes_every=15)),
         "loss": _series("loss", ["total"], np.full(n, 2.0)),
         "update_ratio": _series("update_ratio", _BLOWN, ratio),
         "weight_norm": _series("weight_norm", _BLOWN, np.ones((n, 2)))}
    found = analyze(s, model=LSTM)[0]
    u, f = _one(found, "update_ratio"), _one(found, "gradient_spike")
    assert f.first_step == 150 and u.first_step == 1500
    assert u.severity == f.severity == "warning"
    assert "Probably a consequence" not in u.message + f.message


_THROWN_UP = ("update_ratio", "weight_norm_growth", "loss_diverged")


def test_an_early_blow_up_between_logged_steps_is_measured_against_the_first_norm():
    # lstm_no_clip at seed 1: no logged norm reaches 4x the first, the between-steps maximum does.
    tot = [0.152, 0.27, 0.523, 0.722, 0.617, 0.385] + [0.3] * 44
    between = [0.152, 0.27, 0.614, 0.955, 0.662, 0.576] + [0.35] * 44
    loss = [2.78, 2.02, 2.62, 3.33, 2.63, 2.15] + [1.5] * 44
    f = _one(analyze(_early(tot, loss, between), model=LSTM)[0], "gradient_spike")
    assert f.first_step == 4 and f"to {fmt(0.614)} ({fmt(0.614 / 0.152)}×) between steps 2 and 4" in f.message
    # Without the between-steps maximum, the logged norms alone reach 0.722 / 0.152 = 4.75x at step 6.
    assert _one(analyze(_early(tot, loss), model=LSTM)[0], "gradient_spike").first_step == 6


def test_an_early_rise_that_does_not_hurt_the_loss_or_is_clipped_is_no_spike():
    falling = list(np.linspace(2.8, 1.2, 50))
    assert "gradient_spike" not in _kinds(analyze(_early(_RNN_NORMS, falling), model=LSTM)[0])
    # Clipping in place (the pre-clip norm recorded): the healthy twin, whose pre-clip norm rises 4-6x.
    assert "gradient_spike" not in _kinds(analyze(_early(_RNN_NORMS, _RNN_LOSS, preclip=True), model=LSTM)[0])
    # An MLP's early blow-up is not a clipping matter: other rules own it.
    assert "gradient_spike" not in _kinds(analyze(_early(_RNN_NORMS, _RNN_LOSS))[0])
    # Under Adam the step does not follow the gradient's size: a blow-up is the learning rate's (the small GPT
    # at AdamW lr 1), not a missing clip.
    adam = ModelInfo.from_structure({**_LSTM_DOC, "optimizer": {"class": "AdamW", "groups": [{"lr": 1.0}]}})
    assert "gradient_spike" not in _kinds(analyze(_early(_RNN_NORMS, _RNN_LOSS), model=adam)[0])
    # After the first logged steps the rolling window decides.
    late = [0.6] * 10 + [6.0] * 40
    assert "gradient_spike" not in _kinds(analyze(_early(late, [2.7] * 10 + [40.0] * 40), model=LSTM)[0])


def test_clipping_before_unscale_under_amp_names_unscale():
    n = 20
    scale = np.full(n, 65536.0)
    pre = 65536.0 * np.full(n, 1.1)  # the scaled gradients' norm
    s = {"grad_norm_preclip": _series("grad_norm_preclip", [""], pre),
         "grad_norm_total": _series("grad_norm_total", [""], np.full(n, 1.0)),
         "amp_scale": _series("amp_scale", [""], scale)}
    f = _one(analyze(s)[0], "gradient_clipping")
    assert f.severity == "error" and "scaler.unscale_(optimizer)" in f.suggestion
    s["grad_norm_preclip"] = _series("grad_norm_preclip", [""], np.full(n, 1.5))  # unscaled: clipping on most steps
    f = _one(analyze(s)[0], "gradient_clipping")
    assert f.severity == "warning" and f.message.startswith("Clipping on most steps: ")


def test_a_clipped_recurrent_language_model_that_learns_is_not_warned_about_its_recipe():
    # word_language_model's defaults: SGD at lr 20 with clip 0.25, so every step is clipped and moves the
    # weights by ~20 % of their norm, while the loss falls.
    n = 50
    names = ["rnn.weight_hh_l0", "fc.weight"]
    s = {"grad_norm_preclip": _series("grad_norm_preclip", [""], np.full(n, 0.6)),
         "grad_norm_total": _series("grad_norm_total", [""], np.full(n, 0.25)),
         "update_ratio": _series("update_ratio", names, np.full((n, 2), 0.2)),
         "weight_norm": _series("weight_norm", names, np.ones((n, 2))),
         "loss": _series("loss", ["total"], np.linspace(6.0, 4.5, n))}
    kinds = _kinds(analyze(s, model=LSTM)[0])
    assert kinds["gradient_clipping"] == "info" and kinds["update_ratio"] == "info"
    # The same numbers in a model without recurrence, or with a loss that does not fall, are warnings.
    assert _kinds(analyze(s)[0])["gradient_clipping"] == "warning"
    s["loss"] = _series("loss", ["total"], np.full(n, 6.0))
    kinds = _kinds(analyze(s, model=LSTM)[0])
    assert kinds["gradient_clipping"] == "warning" and kinds["update_ratio"] == "warning"


# ---------------------------------------------------------------- loss jumps, and what NaN may claim
def test_a_loss_jump_right_after_the_first_logged_step_counts():
    # nanoGPT's train.py at lr 3: the jump, then a level that never returns to the start but is no
    # divergence (under 3x the start).
    loss = np.r_[4.3, 1050.0, 200.0, 40.0, np.linspace(10.0, 7.2, 26)]
    f = _one(analyze({"loss": _series("loss", ["total"], loss)})[0], "loss_spike")
    assert f.message.startswith("Loss jumped: 'total' went from 4.3 to 1.05e+03") and f.first_step == 10
    assert "never returned to its start" in f.message


def test_a_loss_jump_between_logged_steps_is_seen_through_the_between_maximum():
    loss = np.linspace(2.0, 1.0, 30)
    between = loss * 1.05
    between[12] = 40.0  # a batch between logged steps 110 and 120
    s = {"loss": _series("loss", ["total"], loss),
         "loss_max_between": _series("loss_max_between", ["total"], between)}
    f = _one(analyze(s)[0], "loss_spike")
    assert "to 40 (" in f.message and "between steps 110 and 120" in f.message
    assert "loss_spike" not in _kinds(analyze({"loss": s["loss"]})[0])  # unseen without it


def _nan_run(every=10, between=None):
    n = 20
    g = np.full(n, 0.5)
    g[-1] = np.nan
    steps = np.arange(n) * every
    s = {"grad_norm": _series("grad_norm", ["rnn.weight_hh_l0"], g, steps),
         "loss": _series("loss", ["total"], np.where(np.isnan(g), np.nan, 2.0), steps)}
    if between is not None:
        s["grad_norm_max_between"] = _series("grad_norm_max_between", [""], between, steps)
        s["loss_max_between"] = _series("loss_max_between", ["total"], np.full(n, 2.0), steps)
    return _one(analyze(s)[0], "nonfinite")


def test_nonfinite_claims_no_growth_only_where_the_steps_before_were_observed():
    f = _nan_run(every=10)
    assert "were not observed" in f.message and "no growth of the gradients" not in f.message
    assert "clip" in f.suggestion
    f = _nan_run(every=1)
    assert "with no growth of the gradients or the loss before it" in f.message and "log(0)" in f.suggestion
    f = _nan_run(every=10, between=np.r_[np.full(19, 0.6), 0.6])
    assert "with no growth of the gradients or the loss before it" in f.message
    f = _nan_run(every=10, between=np.r_[np.full(19, 0.6), np.nan])  # the maximum swallowed the NaN
    assert "were not observed" in f.message
    f = _nan_run(every=10, between=np.r_[np.full(18, 0.6), 5e16, 5e16])
    assert "gradients grew" in f.message and "diverged" in f.suggestion


# ---------------------------------------------------------------- causes over consequences
def test_adam_eps_on_the_weights_of_dead_units_is_a_consequence():
    n = 30
    s = {"dead_fraction": _series("dead_fraction", ["1"], np.full(n, 0.995)),
         "adam_eps_fraction": _series("adam_eps_fraction", ["0.weight", "2.weight"], np.full((n, 2), 0.9)),
         "grad_norm": _series("grad_norm", ["0.weight", "2.weight"], np.full((n, 2), 1e-3))}
    model = _doc(["0.weight", "2.weight"], held=["0.weight", "2.weight"], optimizer="Adam", eps=1e-8)
    found, _ = analyze(s, model=model)
    assert found[0].kind == "dead_relu" and found[0].severity == "error"
    a = _one(found, "adam_eps")
    assert a.severity == "info" and "the dead_relu finding" in a.message
    assert "1e-8" not in a.suggestion.split("already")[0]  # never proposes the value eps already has


def test_a_rule_cannot_report_a_severity_it_did_not_declare():
    def loud(ctx) -> None:
        ctx.add("loss_spike", "error", ["total"], 0, 0, "Loss spikes: x", "y")

    series = {"loss": _series("loss", ["total"], np.ones(5))}
    with pytest.raises(ValueError, match="severity 'error'"):
        analyze(series, rules=[Rule("loud", ("loss_spike",), ("loss",), loud, severities=("warning",))])


# ---------------------------------------------------------------- words
def test_vanishing_gradients_that_starve_most_of_the_net_are_an_error_in_plain_words():
    n = 30
    names = [f"{i}.weight" for i in range(0, 40, 2)] + ["40.weight"]
    g = np.ones((n, len(names)))
    g[:, :-1] = np.logspace(-6, -4, len(names) - 1)  # 1e-6 to 1e-4 of the last layer's
    f = _one(analyze({"grad_norm": _series("grad_norm", names, g)})[0], "vanishing_gradient")
    assert f.severity == "error"
    assert f.message.startswith("Vanishing gradients: 20 tensor(s) ('0.weight', '2.weight', '4.weight', "
                                "'6.weight', ... (20 in all)) get gradients from 1.0e+04× to 1.0e+06× smaller than "
                                "those of '40.weight'")


def test_layer_lists_are_quoted_unique_and_in_model_order():
    assert layer_list(["1", "3", "1"]) == "'1', '3'"
    assert sorted(["11", "2", "1"], key=natural_key) == ["1", "2", "11"]
    ctx = Context({}, Thresholds(), model=_doc(["b.weight", "a.weight"], held=[]))
    assert ctx.in_model_order(["a.weight", "b.weight", "a.weight"]) == ["b.weight", "a.weight"]
    assert Context({}, Thresholds()).in_model_order(["h.11", "h.2"]) == ["h.2", "h.11"]


# ---------------------------------------------------------------- inputs_not_normalised
_MLP_DOC = {"version": 1, "modules": [
    {"name": "", "type": "Sequential", "params": [], "sites": []},
    {"name": "0", "type": "Linear", "params": [{"name": "0.weight"}, {"name": "0.bias"}], "sites": []},
    {"name": "1", "type": "ReLU", "params": [], "sites": []},
    {"name": "2", "type": "Linear", "params": [{"name": "2.weight"}], "sites": []}],
    "optimizer": {"class": "SGD", "groups": [{"lr": 0.05}]}}


def _inputs(std, n=40, dead=False):
    rng = np.random.default_rng(0)
    s = {"input_std": _series("input_std", [""], std * rng.lognormal(0, 0.02, n)),
         "input_mean": _series("input_mean", [""], std * 0.01 * rng.standard_normal(n))}
    if dead:  # the ReLU after the first layer dies at step 40 and stays dead
        s["dead_fraction"] = _series("dead_fraction", ["1"], np.r_[np.zeros(4), np.ones(n - 4)])
    return s


def test_raw_inputs_are_named_as_the_cause_of_the_blow_up_they_explain():
    found, _ = analyze(_inputs(100.0, dead=True), model=ModelInfo.from_structure(_MLP_DOC))
    f = _one(found, "inputs_not_normalised")
    dead = _one(found, "dead_relu")
    assert f.severity == dead.severity == "error" and f.layers == ["0"]
    std = float(np.median(_inputs(100.0)["input_std"].values))
    assert f"the model's input has std {fmt(std)}" in f.message and "initialisation of '0'" in f.message
    assert "the dead_relu finding here follows from it" in f.message
    assert "(x - mean) / std" in f.suggestion


def test_unit_scale_inputs_or_a_norm_layer_first_are_not_reported():
    mlp = ModelInfo.from_structure(_MLP_DOC)
    assert "inputs_not_normalised" not in _kinds(analyze(_inputs(1.0, dead=True), model=mlp)[0])
    assert "inputs_not_normalised" not in _kinds(analyze(_inputs(9.0), model=mlp)[0])
    # Raw inputs that throw nothing up are a note only.
    assert _one(analyze(_inputs(100.0), model=mlp)[0], "inputs_not_normalised").severity == "info"
    normed = {**_MLP_DOC, "modules": [_MLP_DOC["modules"][0], {"name": "bn", "type": "BatchNorm1d", "params": [
        {"name": "bn.weight"}], "sites": []}, *_MLP_DOC["modules"][1:]]}
    assert "inputs_not_normalised" not in _kinds(
        analyze(_inputs(100.0, dead=True), model=ModelInfo.from_structure(normed))[0])



# ---------------------------------------------------------------- the spike detectors' robust-z core
@pytest.mark.parametrize("seed", range(5))
def test_the_robust_z_core_is_a_median_and_mad_z_score(seed):
    from tb_diag_plugin.findings.context import robust_sigma, robust_z, step_noise

    rng = np.random.default_rng(seed)
    w = rng.lognormal(0.0, 0.4, 21)
    w[3] = 50.0  # an outlier moves neither the median nor the MAD
    value = float(rng.uniform(2, 9))
    # Independently: the middle of the sorted window, and the middle of the sorted absolute deviations.
    srt = np.sort(w)
    med = srt[w.size // 2]
    mad = np.sort(np.abs(w - med))[w.size // 2]
    assert robust_sigma(w) == pytest.approx(1.4826 * mad, rel=1e-12)
    assert robust_z(value, w) == pytest.approx((value - med) / (1.4826 * mad), rel=1e-12)
    # A floor above the window's own spread takes over (the run's noise, when the window looks calmer).
    assert robust_z(value, w, floor=10 * mad) == pytest.approx((value - med) / (10 * mad), rel=1e-12)
    # The run's noise: the MAD of its successive differences over sqrt(2); a linear trend cancels out.
    x = np.log(w) + 0.3 * np.arange(w.size)
    d = np.sort(np.diff(x))
    dm = 0.5 * (d[d.size // 2 - 1] + d[d.size // 2])  # 20 differences: the mean of the middle two
    ad = np.sort(np.abs(np.diff(x) - dm))
    assert step_noise(x) == pytest.approx(1.4826 * 0.5 * (ad[9] + ad[10]) / np.sqrt(2), rel=1e-12)
    assert robust_z(2.0, np.ones(5)) == np.inf and robust_z(0.5, np.ones(5)) == -np.inf
    assert step_noise(np.array([1.0, 2.0, np.nan])) == 0.0  # fewer than 3 finite differences
