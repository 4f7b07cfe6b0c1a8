"""AMP on the CPU: bfloat16 autocast with a real `torch.amp.GradScaler("cpu")`."""

from __future__ import annotations

import math

import pytest
import torch
from _logger_helpers import at, close, read, recorded
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics

STEPS = 4


def _run(logdir, *, scaler: bool, unscale_first: bool = False, inf_at=None):
    """Train a small MLP under bf16 autocast; returns (what was read back, raw grad norms at step time)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gs = torch.amp.GradScaler("cpu") if scaler else None
    data = [torch.randn(32, 8, generator=torch.Generator().manual_seed(k)) for k in range(STEPS)]
    raw = {}
    writer = SummaryWriter(str(logdir))
    with Diagnostics(model, writer, every=1, optimizer=opt, scaler=gs) as diag:
        for step, x in enumerate(data):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x).float().pow(2).mean()
            opt.zero_grad()
            (gs.scale(loss) if gs is not None else loss).backward()
            if step == inf_at:
                model[0].weight.grad[0, 0] = float("inf")
            if gs is not None and unscale_first:
                gs.unscale_(opt)
            raw[step] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
            diag.step(step, loss=loss)
            if gs is not None:
                gs.step(opt)
                gs.update()
            else:
                opt.step()
    writer.close()
    return read(logdir), raw


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("plain"), scaler=False)


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler-only", "unscale_-first"])
def test_recorded_gradients_are_unscaled(tmp_path, plain, unscale_first):
    base, _ = plain
    s, raw = _run(tmp_path, scaler=True, unscale_first=unscale_first)
    names = s["grad_norm"].layers
    assert names == base["grad_norm"].layers
    for step in range(STEPS):
        if not unscale_first:  # the gradients really were scaled when step() saw them
            assert raw[step] == pytest.approx(65536.0 * at(s, "grad_norm_total", "", step), rel=1e-4)
        for name in names:
            for metric in ("grad_norm", "grad_max_abs"):
                assert close(at(s, metric, name, step), at(base, metric, name, step), rel=1e-3), (metric, name)
        # A scaled gradient never looks exploding: the total is that of the unscaled run.
        assert close(at(s, "grad_norm_total", "", step), at(base, "grad_norm_total", "", step), rel=1e-3)
        assert at(s, "amp_scale", "", step) == 65536.0
        assert at(s, "amp_skipped", "", step) == 0.0
        assert close(at(s, "loss", "total", step), at(base, "loss", "total", step), rel=1e-3)


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler-only", "unscale_-first"])
def test_a_step_with_inf_gradients_is_recorded_as_skipped(tmp_path, unscale_first):
    s, _ = _run(tmp_path, scaler=True, unscale_first=unscale_first, inf_at=1)
    assert [at(s, "amp_skipped", "", k) for k in range(STEPS)] == [0.0, 1.0, 0.0, 0.0]
    # The scaler backs off after the skipped step.
    assert [at(s, "amp_scale", "", k) for k in range(STEPS)] == [65536.0, 65536.0, 32768.0, 32768.0]
    assert at(s, "grad_nonfinite", "0.weight", 1) == 1
    assert math.isinf(at(s, "grad_norm", "0.weight", 1))
    assert math.isfinite(at(s, "grad_norm", "2.weight", 1))
    # The optimizer step was skipped: no update to measure.
    assert not recorded(s, "update_ratio", "0.weight", 1)
    assert recorded(s, "update_ratio", "0.weight", 0) and recorded(s, "update_ratio", "0.weight", 2)


def test_disabled_scaler_records_scale_one(tmp_path):
    model = nn.Linear(3, 1)
    gs = torch.amp.GradScaler("cpu", enabled=False)
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1, scaler=gs) as diag:
        loss = model(torch.ones(2, 3)).sum()
        gs.scale(loss).backward()
        diag.step(0, loss=loss)
    writer.close()
    s = read(tmp_path)
    assert at(s, "amp_scale", "", 0) == 1.0 and at(s, "amp_skipped", "", 0) == 0.0
    assert close(at(s, "grad_norm", "weight", 0), model.weight.grad.norm().item())


@pytest.mark.parametrize("unscale_first", [True, False])
def test_gradients_stay_unscaled_after_set_optimizer(tmp_path, unscale_first):
    """The scaler keeps its stage per optimizer: after diag.set_optimizer the new one's is read, so the
    norms are divided by the scale exactly when the gradients are still scaled (found by review: the old
    optimizer's stage made every later norm 1/scale too small)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    want = {}
    with Diagnostics(model, logdir=str(tmp_path), every=1, optimizer=opt, scaler=scaler) as diag:
        for step in range(4):
            if step == 2:
                opt = torch.optim.SGD(model.parameters(), lr=0.01)
                diag.set_optimizer(opt)
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            scaler.scale(loss).backward()
            if unscale_first:
                scaler.unscale_(opt)
            g = model.weight.grad.detach().double()
            want[step] = float(g.norm()) / (1.0 if unscale_first else scaler.get_scale())
            diag.step(step, loss=loss)
            scaler.step(opt)
            scaler.update()
    s = read(tmp_path)
    for step in range(4):
        assert at(s, "grad_norm", "weight", step) == pytest.approx(want[step], rel=1e-5)
