"""Activation capture: functional calls inside forward, names, eval passes, selection and cost control."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _logger_helpers import at, close, read, unit_dead_fraction
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics


def _mode_depth() -> int:
    return torch._C._len_torch_function_stack()


class _Block(nn.Module):
    """Only functional activations in forward; records what each returned (a copy, for the hand check)."""

    def __init__(self, trace: list) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.trace = trace

    def forward(self, x):
        h = F.relu(self.fc1(x))
        self.trace.append(("block.relu()", h.detach().clone()))
        g = F.gelu(self.fc2(h))
        self.trace.append(("block.gelu()", g.detach().clone()))
        r = F.relu(g - 0.1)
        self.trace.append(("block.relu()#2", r.detach().clone()))
        s = torch.sigmoid(r)
        self.trace.append(("block.sigmoid()", s.detach().clone()))
        u = (s - 0.6).relu_()
        self.trace.append(("block.relu()#3", u.detach().clone()))
        return u


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trace: list = []
        self.depths: list = []
        self.block = _Block(self.trace)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        self.depths.append(_mode_depth())
        u = self.block(x)
        t = torch.tanh(self.head(u))
        self.trace.append(("tanh()", t.detach().clone()))
        a = self.act(t)
        self.trace.append(("act", a.detach().clone()))
        return a


SITES = ["block.relu()", "block.gelu()", "block.relu()#2", "block.sigmoid()", "block.relu()#3", "tanh()", "act"]


def _train(tmp_path, model, steps, every=1, before_step=None, **kw):
    writer = SummaryWriter(str(tmp_path))
    traces = {}
    with Diagnostics(model, writer, every=every, **kw) as diag:
        for step in range(steps):
            model.trace.clear()
            torch.manual_seed(step)
            out = model(torch.randn(8, 4))
            traces[step] = list(model.trace)
            out.sum().backward()
            if before_step is not None:
                before_step(step)
            diag.step(step)
            model.zero_grad()
    writer.close()
    return read(tmp_path), traces


def test_functional_activations_are_named_after_their_module_and_stable(tmp_path):
    torch.manual_seed(0)
    s, traces = _train(tmp_path, _Net(), steps=3)
    assert s["act_mean"].layers == SITES
    assert s["act_mean"].steps.tolist() == [0, 1, 2]
    assert s["act_mean"].present.all()  # the same names at every step
    assert s["dead_fraction"].layers == ["block.relu()", "block.relu()#2", "block.relu()#3", "act"]
    assert s["saturation"].layers == ["block.sigmoid()", "tanh()"]
    assert s["act_mean"].layer_types == ["F.relu", "F.gelu", "F.relu", "F.sigmoid", "F.relu", "F.tanh", "ReLU"]
    for step, trace in traces.items():
        for name, y in trace:
            y = y.numpy()
            assert close(at(s, "act_mean", name, step), y.mean(), abs_=1e-6), (name, step)
            assert close(at(s, "act_std", name, step), y.std(ddof=1), rel=1e-4, abs_=1e-6), (name, step)
            if name in s["dead_fraction"].layers:
                assert at(s, "dead_fraction", name, step) == pytest.approx(unit_dead_fraction(y)), (name, step)


def test_every_functional_spelling_is_captured(tmp_path):
    class AllFns(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            h = self.fc(x)
            outs = [
                F.relu(h), torch.relu(h), h.relu(), F.gelu(h), F.silu(h), torch.sigmoid(h), F.sigmoid(h),
                torch.tanh(h), h.tanh(), F.leaky_relu(h, 0.1), F.relu(h.clone(), inplace=True), h.clone().sigmoid_(),
            ]
            return torch.stack([o.sum() for o in outs]).sum().reshape(1, 1)

    model = nn.Sequential(AllFns(), nn.ReLU6(), nn.SiLU())
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1) as diag:
        model(torch.randn(4, 3)).sum().backward()
        diag.step(0)
    writer.close()
    s = read(tmp_path)
    assert s["act_mean"].layers == [
        "0.relu()", "0.relu()#2", "0.relu()#3", "0.gelu()", "0.silu()", "0.sigmoid()", "0.sigmoid()#2",
        "0.tanh()", "0.tanh()#2", "0.leaky_relu()", "0.relu()#4", "0.sigmoid()#3", "1", "2",
    ]
    assert s["act_mean"].layer_types[-2:] == ["ReLU6", "SiLU"]
    assert s["dead_fraction"].layers == ["0.relu()", "0.relu()#2", "0.relu()#3", "0.relu()#4", "1"]


def test_eval_passes_under_no_grad_or_inference_mode_are_not_training_statistics(tmp_path):
    model = _Net()
    torch.manual_seed(0)

    def evaluate(step):
        model.trace.clear()
        with torch.no_grad():
            model(torch.full((8, 4), 100.0))  # very different activations
        with torch.inference_mode():
            model(torch.full((8, 4), -100.0))
        model.trace.clear()

    s, traces = _train(tmp_path, model, steps=2, before_step=evaluate)
    for step in (0, 1):
        for name, y in traces[step]:
            assert close(at(s, "act_mean", name, step), y.numpy().mean(), abs_=1e-6), (name, step)
    assert _mode_depth() == 0


def test_non_logged_steps_run_without_the_mode_and_accumulate_nothing(tmp_path):
    model = _Net()
    writer = SummaryWriter(str(tmp_path))
    diag = Diagnostics(model, writer, every=3)
    depths = []
    for step in range(7):
        model.depths.clear()
        out = model(torch.randn(2, 4))
        depths.append(model.depths[0])
        if not diag.should_log(step):
            assert not any(site.seen for site in diag._capture.sites.values())
        out.sum().backward()
        diag.step(step)
    diag.close()
    writer.close()
    assert depths == [1, 0, 0, 1, 0, 0, 1]  # the TorchFunctionMode is active only on logged steps
    assert read(tmp_path)["act_mean"].steps.tolist() == [0, 3, 6]
    assert read(tmp_path)["grad_norm"].steps.tolist() == [0, 3, 6]


def test_include_and_exclude_select_parameters_and_sites(tmp_path):
    s, _ = _train(tmp_path, _Net(), steps=1, include=["block.*"], exclude="*.bias")
    assert s["grad_norm"].layers == ["block.fc1.weight", "block.fc2.weight"]
    assert s["weight_norm"].layers == ["block.fc1.weight", "block.fc2.weight"]
    assert s["act_mean"].layers == [n for n in SITES if n.startswith("block.")]


def test_activations_false_installs_no_hooks(tmp_path):
    model = _Net()
    s, _ = _train(tmp_path, model, steps=1, activations=False)
    assert "act_mean" not in s and "dead_fraction" not in s
    assert "grad_norm" in s
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_module_called_twice_keeps_one_site(tmp_path):
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(self.act(self.fc(x))))

    model = Twice()
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1) as diag:
        x = torch.randn(5, 3)
        model(x).sum().backward()
        diag.step(0)
    writer.close()
    first = torch.relu(model.fc(x))
    second = torch.relu(model.fc(first))
    both = torch.cat([first, second]).detach().numpy()
    s = read(tmp_path)
    assert s["act_mean"].layers == ["act"]
    assert close(at(s, "act_mean", "act", 0), both.mean(), abs_=1e-6)
    assert at(s, "dead_fraction", "act", 0) == pytest.approx(unit_dead_fraction(both))


def test_skipped_step_numbers_still_capture_the_logged_forward(tmp_path):
    # Steps counted in samples (0, 10, 20, ...), every=20: the forward before a logged step is captured.
    model = _Net()
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=20) as diag:
        for step in range(0, 70, 10):
            model(torch.randn(2, 4)).sum().backward()
            diag.step(step)
    writer.close()
    s = read(tmp_path)
    assert s["act_mean"].steps.tolist() == [0, 20, 40, 60]
    assert np.all(s["act_mean"].present)


def test_only_the_root_is_hooked_and_no_global_hook_is_installed(tmp_path):
    """Every step pays the root's two hooks and nothing per module (no module hook, not even a global
    one during logged forwards: they send every module call down torch's slow path); logged steps
    still see every site."""
    from torch.nn.modules import module as module_hooks

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    base = len(module_hooks._global_forward_hooks)
    seen = []
    model[2].register_forward_hook(lambda m, a, o: seen.append(len(module_hooks._global_forward_hooks) - base))
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=3, optimizer=opt) as diag:
        for step in range(6):
            opt.zero_grad()
            model(torch.randn(16, 4)).sum().backward()
            diag.step(step)
            opt.step()
            hooks = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model]
            assert hooks == [0, 0, 1, 0, 0], (step, hooks)  # only the user's own hook on a child
            assert len(module_hooks._global_forward_hooks) == base
    writer.close()
    assert seen == [0] * 6  # not even during the logged forwards (steps 0 and 3)
    s = read(tmp_path)
    assert s["dead_fraction"].layers == ["1"] and s["saturation"].layers == ["3"]
    assert s["dead_fraction"].steps.tolist() == [0, 3]


def test_another_models_modules_inside_forward_are_not_sites(tmp_path):
    """A frozen helper model called inside forward is not this model's: its ReLU counts toward the caller."""
    helper = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x):
            with torch.no_grad():
                x = helper(x)
            return self.fc(x)

    model = Net()
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1) as diag:
        model(torch.randn(8, 4)).sum().backward()
        diag.step(0)
    writer.close()
    assert read(tmp_path)["dead_fraction"].layers == ["relu()"]  # attributed to the root, as before


class _Mixed(nn.Module):
    """Sites of every kind and several shapes: 1-D, 2-D, (N, T, D) and (N, C, H, W); one output
    changed in place after the activation; a child called twice; a ReLU called in a loop."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.shared = nn.Sequential(nn.Linear(6, 6), nn.Tanh())

    def forward(self, x, img, seq):
        h = F.gelu(self.fc(x))
        h.mul_(0.0)  # in place after the activation: the recorded statistics are of what gelu returned
        a = self.shared(x) + self.shared(x * 2)
        b = torch.sigmoid(a * 4)
        c = F.gelu(self.conv(img)).flatten(1).sum(1, keepdim=True)
        d = torch.relu(seq - 0.2).sum(dim=(1, 2))
        e = torch.tanh(x.sum(1) * 3)  # a 1-D output
        for _ in range(3):
            e = F.relu(e - 0.5)
        return (h.sum(1, keepdim=True) + b.sum(1, keepdim=True) + c + d[:, None] + e[:, None]).sum()


def _mixed_run(tmp_path, batch: int, every: int = 1):
    torch.manual_seed(3)
    model = _Mixed()
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=every) as diag:
        for step in range(3):
            for _ in range(2):  # two forwards per step (gradient accumulation)
                x, img, seq = torch.randn(batch, 6), torch.randn(batch, 2, 5, 5), torch.randn(batch, 7, 3)
                model(x, img, seq).backward()
            diag.step(step)
    writer.close()
    return read(tmp_path)


@pytest.mark.parametrize("batch", [1, 16])
def test_small_outputs_reduced_together_match_outputs_reduced_at_once(tmp_path, monkeypatch, batch):
    """Outputs of up to _DEFER_NUMEL elements are copied and reduced in step(), one stack per shape;
    every statistic of every site equals what reducing each output as it comes gives, including
    an output the model changes in place afterwards, a child called twice and repeated calls."""
    from tb_diag_logger import activations

    together = _mixed_run(tmp_path / "together", batch)
    monkeypatch.setattr(activations, "_DEFER_NUMEL", 0)
    at_once = _mixed_run(tmp_path / "at_once", batch)
    for metric in ("act_mean", "act_std", "dead_fraction", "saturation"):
        a, b = together[metric], at_once[metric]
        assert a.layers == b.layers and a.steps.tolist() == b.steps.tolist() == [0, 1, 2], metric
        np.testing.assert_allclose(a.values, b.values, rtol=2e-5, atol=1e-6, err_msg=metric)
    assert together["act_mean"].layers == [
        "gelu()", "shared.1", "sigmoid()", "gelu()#2", "relu()", "tanh()", "relu()#2", "relu()#3", "relu()#4"
    ]
    std = dict(zip(together["act_std"].layers, together["act_std"].values[0]))
    assert std["gelu()"] > 0.05  # gelu's output, not the zeros written into it afterwards


def test_small_outputs_beyond_the_budget_are_reduced_on_the_way(tmp_path, monkeypatch):
    """At most _DEFER_BUDGET elements are held: past it they are reduced at once, with the same result."""
    from tb_diag_logger import activations

    full = _mixed_run(tmp_path / "full", 4)
    monkeypatch.setattr(activations, "_DEFER_BUDGET", 40)
    held = []
    real = activations.ActivationCapture._reduce_deferred

    def spy(self):
        held.append(self._deferred_numel)
        real(self)

    monkeypatch.setattr(activations.ActivationCapture, "_reduce_deferred", spy)
    bounded = _mixed_run(tmp_path / "bounded", 4)
    assert max(held) <= 40 + 4 * 3 * 5 * 5  # the budget plus the one output that passed it (the conv's)
    assert len(held) > 3 * 2
    for metric in ("act_mean", "act_std", "dead_fraction", "saturation"):
        np.testing.assert_allclose(bounded[metric].values, full[metric].values, rtol=2e-5, atol=1e-6)


def test_a_kept_output_changed_in_place_is_left_out_not_misreported(tmp_path):
    """relu/sigmoid/tanh outputs autograd saves are kept without a copy until step(); if one is
    changed in place anyway (here its backward is never needed), its site is left out of that step
    with one warning, instead of statistics of the changed values."""
    import warnings

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            h = torch.relu(self.fc(x))
            h.add_(100.0)  # no error: nothing below needs relu's backward
            return self.out(torch.tanh(x)).sum()

    model = Net()
    writer = SummaryWriter(str(tmp_path))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Diagnostics(model, writer, every=1) as diag:
            for step in range(2):
                model(torch.randn(8, 4)).backward()
                diag.step(step)
    writer.close()
    messages = [str(w.message) for w in record if "tb-diag" in str(w.message)]
    assert len(messages) == 1 and "relu() was changed in place" in messages[0], messages
    s = read(tmp_path)
    assert s["act_mean"].layers == ["tanh()"] and s["act_mean"].steps.tolist() == [0, 1]
    assert "dead_fraction" not in s


def test_a_long_forward_holds_a_bounded_number_of_module_calls(tmp_path):
    """A child called 2,000 times in one forward (an RNN cell, say): the calls remembered to number
    repeated activations stay bounded, and the names are those of a short forward."""
    from tb_diag_logger import activations

    class Cell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, h):
            return torch.tanh(self.fc(h))

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = Cell()

        def forward(self, x, steps):
            h = torch.relu(x)
            for _ in range(steps):
                h = self.cell(h)
            return torch.relu(h).sum()  # the root's second relu: "relu()#2" however long the loop

    model = Loop()
    held = []
    model.cell.register_forward_hook(lambda m, a, o: held.append(len(diag._capture._calls)))
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1) as diag:
        model(torch.randn(4, 3), 2000).backward()
        diag.step(0)
        model(torch.randn(4, 3), 3).backward()
        diag.step(1)
    writer.close()
    assert max(held) <= activations._MAX_CALLS + 2
    s = read(tmp_path)
    assert s["act_mean"].layers == ["relu()", "cell.tanh()", "relu()#2"]
    assert s["act_mean"].steps.tolist() == [0, 1]


def test_a_root_that_calls_itself_is_captured_until_the_outer_call_returns(tmp_path):
    """The root module called inside its own forward: the capture stays on until the outermost call
    returns (the tanh after the inner call is seen), and is off after it."""

    class Recursive(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, depth: int = 1):
            h = torch.relu(self.fc(x))
            if depth:
                h = self(h, depth - 1)
            return torch.tanh(h)

    model = Recursive()
    x = torch.randn(8, 4)
    with Diagnostics(model, SummaryWriter(str(tmp_path)), every=1) as diag:
        model(x).sum().backward()
        capture = diag._capture
        assert capture._mode is None and capture._depth == 0
        assert capture.sites["tanh()"].count == 2 * x.numel()  # inner call's and outer call's
        assert capture.sites["relu()"].count == 2 * x.numel()
        diag.step(0)


def test_a_hand_built_gelu_module_is_one_site_and_its_inner_tanh_is_none(tmp_path):
    """transformers' NewGELUActivation is 0.5x(1 + tanh(...)): the module's output is the site (as for
    nn.GELU), its inner tanh is not (its saturation would blame GPT-2's GELU for what a tanh layer does)."""
    from transformers.activations import NewGELUActivation

    class Tanh(nn.Module):  # an activation written by hand with torch.tanh: a real tanh site
        def forward(self, x):
            return torch.tanh(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), NewGELUActivation(), nn.Linear(8, 8), Tanh(), nn.Linear(8, 1))
    outs = []
    model[1].register_forward_hook(lambda m, a, y: outs.append(y.detach().double()))
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1) as diag:
        for step in range(2):
            model(torch.randn(8, 4)).sum().backward()
            diag.step(step)
            model.zero_grad()
    writer.close()
    s = read(tmp_path)
    assert sorted(s["act_mean"].layers) == ["1", "3.tanh()"]
    assert s["saturation"].layers == ["3.tanh()"]
    for step in range(2):
        assert close(at(s, "act_mean", "1", step), float(outs[step].mean()), rel=1e-5)
        assert close(at(s, "act_std", "1", step), float(outs[step].std()), rel=1e-4)
