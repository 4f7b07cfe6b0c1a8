"""Issue 15's logger side: unknown activation statistics, grad_missing, the structure's optimizer view,
output-logit growth and Adam state, each against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _logger_helpers import at, close, read, unit_dead_fraction
from torch import nn

from tb_diag_logger import Diagnostics
from tb_diag_plugin.reading import LocalReader


def test_activation_statistics_of_non_finite_activations_are_nan_not_zero(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    inputs = {0: torch.randn(6, 3), 1: torch.full((6, 3), float("nan")), 2: torch.full((6, 3), float("inf"))}
    hidden = {}
    with Diagnostics(model, logdir=str(tmp_path), every=1) as diag:
        for step, x in inputs.items():
            hidden[step] = torch.relu(model[0](x)).detach().numpy()
            model(x).sum().backward()
            diag.step(step)
    series = read(tmp_path)
    assert close(at(series, "dead_fraction", "1", 0), unit_dead_fraction(hidden[0]))
    assert close(at(series, "act_mean", "1", 0), float(hidden[0].mean()))
    for step in (1, 2):
        # NaN compares false, so "never positive" used to read 0 dead units here.
        assert not np.isfinite(hidden[step]).all()
        for metric in ("dead_fraction", "act_mean", "act_std"):
            assert math.isnan(at(series, metric, "1", step)), (metric, step)


class _Branches(nn.Module):
    """A frozen part, an encoder whose output is detached (the textbook bug) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(3, 3)
        self.encoder = nn.Linear(3, 3)
        self.head = nn.Linear(6, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.cat([self.frozen(x), self.encoder(x).detach()], dim=-1))


def test_grad_missing_and_the_optimizer_view_of_the_structure(tmp_path):
    torch.manual_seed(0)
    model = _Branches()
    opt = torch.optim.AdamW(
        [{"params": model.head.parameters(), "weight_decay": 0.1},
         {"params": model.encoder.parameters(), "lr": 1e-3, "weight_decay": 0.0}],
        lr=1e-2, eps=1e-7, betas=(0.8, 0.99),
    )
    expected = {}
    with Diagnostics(model, logdir=str(tmp_path), every=2, optimizer=opt) as diag:
        for step in range(5):
            opt.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            if step % 2 == 0:
                expected[step] = {n: 1.0 if p.grad is None else 0.0 for n, p in model.named_parameters()}
            diag.step(step)
            opt.step()
    series = read(tmp_path)
    assert series["grad_missing"].steps.tolist() == [0, 2, 4]
    for step, want in expected.items():
        for name, value in want.items():
            assert at(series, "grad_missing", name, step) == value, (name, step)
    assert expected[0]["encoder.weight"] == 1.0 and expected[0]["head.weight"] == 0.0  # the test means something

    doc = LocalReader(str(tmp_path)).structure(".")
    params = {p["name"]: p for m in doc["modules"] for p in m["params"]}
    for name, p in model.named_parameters():
        assert params[name]["requires_grad"] == p.requires_grad
        assert params[name]["in_optimizer"] == (not name.startswith("frozen"))
    optimizer = doc["optimizer"]
    assert optimizer["class"] == "AdamW"
    for got, group in zip(optimizer["groups"], opt.param_groups):
        assert got["lr"] == group["lr"] and got["weight_decay"] == group["weight_decay"]
        assert got["eps"] == 1e-7 and got["betas"] == [0.8, 0.99] and "momentum" not in got
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["params"] for g in optimizer["groups"]] == [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def test_structure_without_optimizer_says_none(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    with Diagnostics(model, logdir=str(tmp_path), every=1) as diag:
        model(torch.randn(3, 2)).sum().backward()
        diag.step(0)
    doc = LocalReader(str(tmp_path)).structure(".")
    params = {p["name"]: p for m in doc["modules"] for p in m["params"]}
    assert doc["optimizer"] is None
    assert params["0.weight"]["requires_grad"] is False and params["2.weight"]["requires_grad"] is True
    assert all(p["in_optimizer"] is None for p in params.values())


def _adam_by_hand(opt: torch.optim.Optimizer, p: torch.Tensor) -> tuple[float, float]:
    """(share of sqrt(v_hat) < eps, RMS of m_hat / (sqrt(v_hat) + eps)) from the optimizer's state, in float64."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    state = opt.state[p]
    t = float(state["step"])
    b1, b2 = group["betas"]
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    v_hat = v.double().numpy() / (1 - b2**t)
    m_hat = state["exp_avg"].double().numpy() / (1 - b1**t)
    root = np.sqrt(v_hat)
    return float(np.mean(root < group["eps"])), float(np.sqrt(np.mean((m_hat / (root + group["eps"])) ** 2)))


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=3e-3),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=3e-3, amsgrad=True),
], ids=["adamw", "adam-amsgrad"])
def test_adam_eps_fraction_and_update_rms_match_the_optimizer_state(tmp_path, make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = make(model.parameters())
    expected = {}
    with Diagnostics(model, logdir=str(tmp_path), every=2, optimizer=opt) as diag:
        for step in range(7):
            opt.zero_grad()
            x = torch.randn(16, 4) * torch.tensor([1.0, 1.0, 1e-3, 1e-3])  # tiny gradients: eps matters
            F.cross_entropy(model(x), torch.randint(0, 2, (16,))).backward()
            if step % 2 == 0 and opt.state:
                expected[step] = {n: _adam_by_hand(opt, p) for n, p in model.named_parameters()}
            diag.step(step)
            opt.step()
    series = read(tmp_path)
    assert series["adam_eps_fraction"].steps.tolist() == sorted(expected) == [2, 4, 6]  # step 0: no state yet
    fractions = []
    for step, want in expected.items():
        for name, (frac, rms) in want.items():
            assert close(at(series, "adam_eps_fraction", name, step), frac, rel=1e-6, abs_=1e-6), (name, step)
            assert close(at(series, "update_rms", name, step), rms, rel=1e-4), (name, step)
            fractions.append(frac)
    assert 0 < max(fractions) < 1  # some entries are eps-dominated, not all


def test_sgd_records_no_adam_state(tmp_path):
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Diagnostics(model, logdir=str(tmp_path), every=1, optimizer=opt) as diag:
        for step in range(3):
            opt.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            diag.step(step)
            opt.step()
    series = read(tmp_path)
    assert "adam_eps_fraction" not in series and "update_rms" not in series
    assert LocalReader(str(tmp_path)).structure(".")["optimizer"]["groups"][0]["momentum"] == 0.9


def _logit_stats(y: np.ndarray) -> tuple[float, float]:
    """(max |y|, mean over rows of log-sum-exp over the last dim), float64 by hand."""
    y = y.astype(np.float64).reshape(-1, y.shape[-1])
    top = y.max(axis=1, keepdims=True)
    lse = np.log(np.exp(y - top).sum(axis=1)) + top[:, 0]
    return float(np.abs(y).max()), float(lse.mean())


class _TupleLM(nn.Module):
    """nanoGPT's shape: forward returns (logits, loss); the head is `lm_head`, defined last."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.lm_head = nn.Linear(8, 11)
        self.aux = nn.Linear(8, 3)  # a later Linear of another width is not the head

    def forward(self, idx, targets):
        logits = self.lm_head(torch.relu(self.emb(idx))) * 4.0
        return logits, F.cross_entropy(logits.view(-1, 11), targets.view(-1)) + self.aux(self.emb(idx)).mean() * 0


def test_logit_statistics_of_a_classifier_over_accumulated_micro_batches(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
    expected = {}
    with Diagnostics(model, logdir=str(tmp_path), every=3) as diag:
        for step in range(7):
            outs = []
            for _ in range(2):  # gradient accumulation: both micro-batches count
                y = model(torch.randn(6, 4) * (1 + step))
                outs.append(y.detach().numpy())
                y.sum().backward()
            with torch.no_grad():
                model(torch.randn(6, 4) * 100)  # an evaluation pass is not mixed in
            expected[step] = _logit_stats(np.concatenate(outs))
            diag.step(step)
    series = read(tmp_path)
    assert series["logit_max_abs"].layers == ["2"]  # the last Linear, producing the output
    assert series["logit_lse"].steps.tolist() == [0, 3, 6]  # logged steps only
    for step in (0, 3, 6):
        big, lse = expected[step]
        assert close(at(series, "logit_max_abs", "2", step), big)
        assert close(at(series, "logit_lse", "2", step), lse, rel=1e-5)


def test_logit_statistics_of_tuple_and_hugging_face_outputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    for name, model, run in (("lm_head", _TupleLM(), lambda m, i: m(i, i)),
                             ("lm_head", gpt, lambda m, i: m(input_ids=i, labels=i))):
        logdir = tmp_path / type(model).__name__
        expected = {}
        with Diagnostics(model, logdir=str(logdir), every=2) as diag:
            for step in range(3):
                idx = torch.randint(0, 11, (2, 6))
                out = run(model, idx)
                logits, loss = (out.logits, out.loss) if hasattr(out, "logits") else out
                expected[step] = _logit_stats(logits.detach().numpy())
                loss.backward()
                diag.step(step, loss=loss)
        series = read(logdir)
        assert series["logit_max_abs"].layers == [name], type(model).__name__
        for step in (0, 2):
            big, lse = expected[step]
            assert close(at(series, "logit_max_abs", name, step), big)
            assert close(at(series, "logit_lse", name, step), lse, rel=1e-5)


class _Wrapper(nn.Module):
    """Every parameter in one child; the root's own forward shifts the child's output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))

    def forward(self, x):
        return self.body(x) - 100.0


@pytest.mark.parametrize("through_root", [True, False], ids=["model(x)", "model.body(x)"])
def test_logits_of_a_root_whose_parameters_are_all_in_one_child(tmp_path, through_root):
    """Through the root, its output is the logits and the child's is not mixed in (the shift would show in
    `logit_max`); trained through the child alone (a LightningModule's `self.net(x)`), the child's output."""
    torch.manual_seed(0)
    model = _Wrapper()
    outs = {}
    with Diagnostics(model, logdir=str(tmp_path), every=1) as diag:
        for step in range(3):
            y = model(torch.randn(6, 4)) if through_root else model.body(torch.randn(6, 4))
            outs[step] = y.detach().double().numpy()
            y.square().mean().backward()
            diag.step(step)
    series = read(tmp_path)
    assert series["logit_max"].layers == ["body.2"]
    for step, y in outs.items():
        assert close(at(series, "logit_max", "body.2", step), y.max(), rel=1e-5), step
        assert close(at(series, "logit_min", "body.2", step), y.min(), rel=1e-5), step
        assert close(at(series, "logit_max_abs", "body.2", step), np.abs(y).max(), rel=1e-5), step
