"""The logger's shape: collectors gathered in one transfer, observers of each written step, reduction
plans chosen once per layout, and Adam's state read block by block."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _logger_helpers import at, read
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics, reductions
from tb_diag_logger.collectors import Collector, optim_state


def test_a_collector_hears_every_step_and_the_arming_through_the_interface(tmp_path):
    """`on_step` at every step() (with the step's loss in the context) before a logged step's `parts`, and
    `arm` after it with whether the next step is logged: Diagnostics calls no collector by name."""

    class Probe(Collector):
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def on_step(self, step: int) -> None:
            self.calls.append(("on_step", step, float(self.ctx.total_loss)))

        def parts(self, step: int) -> list:
            self.calls.append(("parts", step))
            return []

        def arm(self, on: bool) -> None:
            self.calls.append(("arm", on))

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    every, probe = 3, Probe()
    with Diagnostics(model, logdir=tmp_path, every=every) as diag:
        probe.ctx = diag.collectors[0].ctx
        diag.collectors.append(probe)
        for step in range(7):
            model.zero_grad()
            model(torch.randn(6, 4)).pow(2).mean().backward()
            diag.step(step, loss=float(step) / 2)
    expected = []
    for step in range(7):
        expected.append(("on_step", step, step / 2))
        if step % every == 0:
            expected.append(("parts", step))
        expected.append(("arm", (step + 1) % every == 0))
    assert probe.calls == expected


def test_observers_see_exactly_what_each_step_writes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seen: dict[int, list] = {}
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=2, optimizer=opt) as diag:
        diag.observers.append(lambda step, items: seen.setdefault(step, []).extend(items))
        for step in range(5):
            opt.zero_grad()
            loss = model(torch.randn(6, 4)).pow(2).mean()
            loss.backward()
            diag.step(step, loss=loss)
            opt.step()
        diag.evaluate(4, loss=0.5)
    writer.close()
    series = read(tmp_path)
    written = {(m, step) for m, s in series.items() for step in s.steps.tolist()}
    observed = {(m, step) for step, items in seen.items() for m, _, _, _ in items}
    assert observed == written
    assert {"grad_norm", "dead_fraction", "loss", "adam_eps_fraction", "update_ratio", "val_loss"} <= {
        m for m, _ in observed}
    for step, items in seen.items():
        for metric, names, _, values in items:
            for name, value in zip(names, values):
                expected = at(series, metric, name, step)
                assert (math.isnan(value) and math.isnan(expected)) or value == pytest.approx(expected), metric


def test_a_reduction_plan_is_made_once_per_layout_and_forced_by_argument():
    tensors = [torch.randn(3, 4), torch.randn(5)]
    planner = reductions.Planner()
    plan = planner(tensors)
    assert plan.impl == "flat" and planner([torch.randn(3, 4), torch.randn(5)]) is plan
    assert planner([torch.randn(3, 4), torch.randn(6)]) is not plan  # another layout, another plan
    assert reductions.Planner("foreach")(tensors).impl == "foreach"
    assert reductions.Planner("stream")([torch.randn(2, dtype=torch.bfloat16)]).impl == "foreach"  # not CPU fp32
    norms = [reductions.grouped_norms(tensors, torch.device("cpu"), impl=i) for i in reductions.IMPLEMENTATIONS]
    expected = [float(np.linalg.norm(t.numpy())) for t in tensors]
    for n in norms:
        np.testing.assert_allclose(n.numpy(), expected, rtol=1e-6)


def test_an_unknown_implementation_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="impl must be one of"):
        Diagnostics(nn.Linear(2, 2), logdir=str(tmp_path), impl="fused")


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_state_of_big_and_small_tensors_matches_a_float64_computation(amsgrad):
    """A tensor big enough to be read block by block, one that is not, and a NaN in the second moment."""
    torch.manual_seed(0)
    big = nn.Parameter(torch.randn(3 * optim_state._BLOCK_NUMEL + 5))
    small = nn.Parameter(torch.randn(7, 3))
    odd = nn.Parameter(torch.randn(optim_state._BLOCK_NUMEL + 1))
    params = [("big", big), ("small", small), ("odd", odd)]
    opt = torch.optim.Adam([big, small, odd], lr=1e-3, betas=(0.8, 0.99), eps=1e-3, amsgrad=amsgrad)
    for _ in range(3):
        for p in (big, small, odd):
            p.grad = torch.randn_like(p) * 10.0 ** torch.randint(-5, 1, p.shape)
        opt.step()
    second = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
    opt.state[odd][second][17] = float("nan")
    out = {metric: dict(zip(names, values.tolist()))
           for metric, names, values in optim_state.adam_state(params, opt, torch.device("cpu"))}
    for name, p in params:
        m = opt.state[p]["exp_avg"].double().numpy()
        v = opt.state[p][second].double().numpy()
        bc1, bc2 = 1 - 0.8 ** 3, 1 - 0.99 ** 3
        root = np.sqrt(v / bc2)
        if name == "odd":  # unknown is never a number
            assert math.isnan(out[optim_state.EPS_FRACTION][name]) and math.isnan(out[optim_state.UPDATE_RMS][name])
            continue
        assert out[optim_state.EPS_FRACTION][name] == pytest.approx(np.mean(root < 1e-3), abs=1e-6)
        rms = np.sqrt(np.mean((m / bc1 / (root + 1e-3)) ** 2))
        assert out[optim_state.UPDATE_RMS][name] == pytest.approx(rms, rel=1e-5)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that bring a tensor's values to the host (a synchronisation on a GPU)."""

    READS = {torch.Tensor.cpu, torch.Tensor.item, torch.Tensor.tolist}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def test_a_logged_step_reads_its_values_on_the_host_once(tmp_path):
    """every=1 with Adam, activations, logits, a per-sample loss and the update ratio of the step before:
    one host read per step() (the update ratio and Adam's state ride in it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reads = []
    with Diagnostics(model, logdir=str(tmp_path), every=1, optimizer=opt) as diag:
        for step in range(4):
            opt.zero_grad()
            per_sample = model(torch.randn(6, 4)).pow(2).mean(1)
            per_sample.mean().backward()
            with _HostReads() as mode:
                diag.step(step, loss=per_sample.mean(), losses={"ps": per_sample.detach()})
            reads.append(mode.count)
            opt.step()
    assert reads == [1, 1, 1, 1]
