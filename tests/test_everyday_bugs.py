"""The catalogue of everyday loop bugs (`tests/everyday_bugs.py`, issue 22 point 6).

The catalogue's shape is checked without training; a handful of its cases
are trained at seed 0 through the real logger, read back as `tb-diag report`
reads them, and judged on their labels: the labelled kinds fire (warning or
error) on the labelled layers, nothing outside `kinds` + `allowed` fires, the
expected `DiagnosticsWarning` is raised, and the most severe finding names the
cause in its words. Healthy twins must produce nothing above info. Cases that
today's rules or logger cannot get right yet are listed in `WAITS` with the
branch they wait for; they run as strict xfails, so a case that starts passing
fails the test until it is taken off the list.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from everyday_bugs import BROKEN, BUGS, HEALTHY, Bug, names_cause, train
from tb_diag_logger import Diagnostics, DiagnosticsWarning
from tb_diag_plugin import findings, metadata
from tb_diag_plugin.findings.context import Finding
from tb_diag_plugin.reading import LocalReader
from tb_diag_plugin.series import Series

# The kinds issue 22 names (BRANCHES.md); rules22 adds them to metadata.FINDING_KINDS.
NEW_KINDS = ("not_in_optimizer", "grad_not_reset", "module_mode", "lr_collapsed", "lr_unbounded", "lr_zero",
             "output_loss_mismatch", "gradient_spike")

# Trained at seed 0 by `test_case_at_seed_0`.
TRAINED = (
    "healthy_mlp_loop", "healthy_mlp_log_softmax_nll", "healthy_cnn_eval_toggle",
    "healthy_finetune_head_replaced_before", "healthy_amp_unscale_then_clip",
    "mlp_labels_off_by_one", "regression_broadcast_target", "regression_loss_summed",
    "mlp_no_zero_grad", "mlp_scheduler_per_batch", "mlp_lr_int_zero", "mlp_softmax_into_cross_entropy",
    "cnn_eval_never_undone", "finetune_head_replaced_after_optimizer", "amp_clip_scaled_gradients",
    "gpt_diag_step_before_backward", "rnn_tanh_no_clip", "healthy_rnn_tanh_clipped", "lstm_no_clip",
    "mlp_unnormalised_inputs",
)

# What each trained case still waits for, with rules22 and wiring22 merged (branch: what is missing).
# amp_clip_scaled_gradients and healthy_rnn_tanh_clipped left this list with rules22's 710d256/a52e72f,
# rnn_tanh_no_clip with spike22 (a blow-up before any window, against the first logged norm).
# Keep it true: these are strict xfails. Before that merge, every wiring bug here waited too.
WAITS: dict[str, str] = {}


# ------------------------------------------------------------------ the catalogue's shape
def test_catalogue_size_and_families():
    assert len(BROKEN) >= 25 and len(HEALTHY) >= 10
    families = {BUGS[n].family for n in BROKEN}
    assert {"mlp", "cnn", "residual", "rnn", "gpt", "finetune", "amp"} <= families


def test_every_label_is_a_known_kind_and_every_twin_exists():
    known = set(metadata.FINDING_KINDS) | set(NEW_KINDS)
    for name, bug in BUGS.items():
        assert set(bug.kinds) | set(bug.allowed) <= known, name
        assert set(bug.layers) <= set(bug.kinds), name
        if bug.twin:
            assert BUGS[bug.twin].healthy, (name, bug.twin)
        if not bug.healthy:
            # A bug says what must be found, or why its cause cannot be seen, and names its source.
            assert bug.kinds or bug.warns or bug.beyond, name
            assert len(inspect.getdoc(bug.build) or "") > 40, name
    # Each wiring kind of issue 22 has a labelled bug.
    labelled = {k for n in BROKEN for k in BUGS[n].kinds}
    assert set(NEW_KINDS) <= labelled


def test_waits_names_only_trained_cases():
    assert set(WAITS) <= set(TRAINED) and set(TRAINED) <= set(BUGS)


def _finding(severity: str, message: str, suggestion: str = "", kind: str = "loss_not_decreasing") -> Finding:
    return Finding(kind, severity, [], 0, 1, message, suggestion)


def test_names_cause_reads_only_the_most_severe_findings():
    bug = BUGS["mlp_no_zero_grad"]
    assert bug.cause == ("zero_grad",)
    named = _finding("warning", "Gradients never reset", "call optimizer.zero_grad() before backward()")
    assert names_cause(bug, [named])
    # An error elsewhere outranks it: the user reads the error first.
    assert not names_cause(bug, [named, _finding("error", "Exploding gradients in 0.weight")])
    assert not names_cause(bug, [_finding("info", "zero_grad missing?")])
    either = Bug("x", bug.build, ("lr_unbounded",), cause=("learning rate", "schedul|exponential"))
    assert names_cause(either, [_finding("error", "Learning rate grows exponentially")])
    assert not names_cause(either, [_finding("error", "Learning rate is large")])


# ------------------------------------------------------------------ trained at seed 0
def _judge(bug: Bug, found: list, said: list[str]) -> list[str]:
    """What is wrong with a run against its labels (empty: nothing)."""
    fired: dict[str, set[str]] = {}
    for f in found:
        if f.severity in ("warning", "error"):
            fired.setdefault(f.kind, set()).update(f.layers)
    if bug.healthy:
        return [f"{f.kind} at {f.severity}" for f in found if f.severity != "info"]
    problems = [f"missed {k}" for k in bug.kinds if k not in fired]
    problems += [f"{k} misses layers {sorted(set(bug.layers.get(k, ())) - fired[k])}"
                 for k in bug.kinds if k in fired and not set(bug.layers.get(k, ())) <= fired[k]]
    problems += [f"false alarm {k}" for k in fired if k not in bug.kinds and k not in bug.allowed]
    text = " ".join(said).lower()
    problems += [f"no DiagnosticsWarning naming {w!r}" for w in bug.warns if w.lower() not in text]
    if bug.cause and not names_cause(bug, found):
        problems.append(f"no severe finding names the cause {bug.cause}")
    return problems


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason="waits for " + WAITS[n], strict=True)) if n in WAITS else n
    for n in TRAINED
])
def test_case_at_seed_0(name, tmp_path):
    bug = BUGS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(bug, str(tmp_path), seed=0)
    finally:
        torch.set_num_threads(threads)
    said = [str(w.message) for w in caught if issubclass(w.category, DiagnosticsWarning)]
    reader = LocalReader(str(tmp_path))
    found, _ = findings.analyze(reader.series(name), model=findings.ModelInfo.from_structure(reader.structure(name)))
    assert _judge(bug, found, said) == []


# ------------------------------------------------------------------ the early blow-up names its cause once
_THROWN_UP = ("update_ratio", "weight_norm_growth", "loss_diverged")


def _trained(case, tmp_path) -> list:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(case, str(tmp_path), seed=0)
    finally:
        torch.set_num_threads(threads)
    reader = LocalReader(str(tmp_path))
    return findings.analyze(reader.series(case.name), model=findings.ModelInfo.from_structure(
        reader.structure(case.name)))[0]


def test_an_unclipped_rnn_s_blow_up_is_one_error_with_what_it_throws_up_below_it(tmp_path):
    found = _trained(BUGS["rnn_tanh_no_clip"], tmp_path)
    spike = found[0]
    assert spike.kind == "gradient_spike" and spike.severity == "error"
    assert "within the first logged steps" in spike.message and "clip_grad_norm_" in spike.suggestion
    assert [f.kind for f in found if f.severity != "info"] == ["gradient_spike"]
    below = f"Probably a consequence of gradient spikes (the gradient_spike finding, from step {spike.first_step})."
    for kind in _THROWN_UP:
        f = next(f for f in found if f.kind == kind)
        assert f.severity == "info" and below in f.message, kind


def test_a_learning_rate_blow_up_keeps_its_own_findings(tmp_path):
    # The small GPT at AdamW lr 1 (the labelled suite's gpt_lr_blowup): an attention model without clipping
    # whose loss jumps within its first logged steps, but under Adam, so the learning rate is the cause.
    import pathologies

    found = _trained(pathologies.ALL["gpt_lr_blowup"], tmp_path)
    assert "gradient_spike" not in {f.kind for f in found}
    assert found[0].kind == "loss_diverged" and found[0].severity == "error"
    for kind in _THROWN_UP:
        f = next(f for f in found if f.kind == kind)
        assert f.severity != "info" and "Probably a consequence" not in f.message, kind


def _upto(series: dict, step: int) -> dict:
    """The run's series as they stood at `step` (what the live findings read there)."""
    out = {}
    for m, x in series.items():
        keep = x.steps <= step
        if keep.any():
            out[m] = Series(x.metric, x.layers, x.layer_types, x.steps[keep], x.values[keep], x.present[keep])
    return out


def test_stop_on_error_stops_an_unclipped_rnn_on_its_cause_where_its_symptoms_would(tmp_path):
    bug = BUGS["rnn_tanh_no_clip"]
    tr = bug.build(torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            diag = Diagnostics(tr.model, logdir=str(tmp_path), every=tr.every, optimizer=tr.opt, stop_on="error")
            diag._live.share = 1.0  # every logged step evaluated (no time budget): the stop step is the rules' alone
            for step in range(tr.steps):  # the user's loop without clipping, stopped when asked
                tr.opt.zero_grad()
                loss, parts = tr.loss(step)
                loss.backward()
                diag.step(step, loss=loss, losses=parts)
                tr.opt.step()
                if diag.should_stop:
                    break
            found = diag.findings()
            diag.close()
    finally:
        torch.set_num_threads(threads)
    assert diag.should_stop and step < tr.steps - 1
    errors = [f for f in found if f.severity == "error"]
    assert [f.kind for f in errors] == ["gradient_spike"] and found[0] is errors[0]
    assert any(f.kind in _THROWN_UP and f.severity == "info" for f in found)
    # Where the symptoms alone would have stopped it: read without the model's structure (no recurrent
    # model, no early spike), the run has an error among them at that step and none at the logged step before.
    series = LocalReader(str(tmp_path.parent)).series(tmp_path.name)  # the run written straight into tmp_path
    alone = findings.analyze(_upto(series, step))[0]
    assert "gradient_spike" not in {f.kind for f in alone}
    assert any(f.kind in _THROWN_UP and f.severity == "error" for f in alone)
    assert not any(f.severity == "error" for f in findings.analyze(_upto(series, step - tr.every))[0])

