"""Safety: hooks come off, nothing outlives a step, failures warn once, torch.compile is handled."""

from __future__ import annotations

import gc
import os
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from _logger_helpers import read
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics, DiagnosticsWarning, reductions


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return torch.tanh(self.b(F.gelu(self.act(self.a(x)))))


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _diag_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DiagnosticsWarning)]


def test_close_removes_every_hook_and_is_idempotent(tmp_path):
    model = _Small()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path))
    diag = Diagnostics(model, writer, every=1, optimizer=opt)
    assert not _no_hooks(model) and opt._optimizer_step_pre_hooks and opt._optimizer_step_post_hooks
    model(torch.randn(2, 8)).sum().backward()
    diag.step(0)
    opt.step()
    model(torch.randn(2, 8))  # the next forward is captured (armed) when close() comes
    diag.close()
    assert _no_hooks(model)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert torch._C._len_torch_function_stack() == 0
    diag.close()  # again: nothing happens
    with pytest.raises(RuntimeError, match="after close"):
        diag.step(1)
    writer.close()
    assert "update_ratio" in read(tmp_path)  # close() wrote the pending update ratio


def test_context_manager_closes(tmp_path):
    model = _Small()
    with Diagnostics(model, logdir=str(tmp_path), every=1) as diag:
        model(torch.randn(2, 8)).sum().backward()
        diag.step(0)
    assert _no_hooks(model)
    assert "grad_norm" in read(tmp_path)  # its own writer was closed, so everything is on disk


def test_close_during_a_forward_leaves_no_mode_active(tmp_path):
    class Closing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.diag = None

        def forward(self, x):
            h = F.relu(self.fc(x))
            self.diag.close()
            return F.relu(h)

    model = Closing()
    writer = SummaryWriter(str(tmp_path))
    model.diag = Diagnostics(model, writer, every=1)
    model(torch.ones(1, 2))
    assert torch._C._len_torch_function_stack() == 0
    assert _no_hooks(model)
    writer.close()


def test_nothing_of_a_step_outlives_it(tmp_path):
    model = _Small()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path))
    diag = Diagnostics(model, writer, every=1, optimizer=opt)
    refs = []
    for step in range(3):
        x = torch.randn(4, 8)
        out = model(x)
        per_sample = out.pow(2).mean(1)
        loss = per_sample.mean()
        opt.zero_grad()
        loss.backward()
        diag.step(step, loss=loss, losses={"ps": per_sample})
        opt.step()
        refs += [weakref.ref(t) for t in (x, out, per_sample, loss)]
        del x, out, per_sample, loss
    gc.collect()
    assert all(r() is None for r in refs), "the logger kept a reference to a batch, an activation or a loss"
    diag.close()
    writer.close()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor or type(o) is nn.Parameter)


@pytest.fixture
def one_thread():
    """Tiny tensors on a busy 2-core machine: OpenMP threads only add waiting (GELU takes ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_memory_is_flat_over_2000_steps(tmp_path, one_thread):
    torch.manual_seed(0)
    model = _Small()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = SummaryWriter(str(tmp_path))
    diag = Diagnostics(model, writer, every=10, optimizer=opt)
    x = torch.randn(16, 8)
    marks = {}
    for step in range(2000):
        out = model(x)
        per_sample = out.pow(2).mean(1)
        loss = per_sample.mean()
        opt.zero_grad()
        loss.backward()
        diag.step(step, loss=loss, losses={"ps": per_sample, "scalar": loss * 0.5})
        opt.step()
        if step in (199, 1999):
            del out, per_sample, loss
            gc.collect()
            marks[step] = (_rss(), _live_tensors(), len(gc.get_objects()))
    diag.close()
    writer.close()
    (rss0, tensors0, objects0), (rss1, tensors1, objects1) = marks[199], marks[1999]
    assert tensors1 == tensors0, f"live tensors grew from {tensors0} to {tensors1}"
    assert objects1 - objects0 < 500, f"Python objects grew from {objects0} to {objects1}"
    assert rss1 - rss0 < 8 * 2**20, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB over 1800 steps"
    assert read(tmp_path)["grad_norm"].steps.size == 200


@pytest.mark.parametrize("batch", [2, 512], ids=["small_outputs_reduced_at_step", "big_outputs_reduced_at_once"])
def test_a_failing_activation_hook_warns_once_and_training_goes_on(tmp_path, monkeypatch, batch):
    def broken(y, stacked=False):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(reductions, "unit_max", broken)
    model = _Small()
    writer = SummaryWriter(str(tmp_path))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Diagnostics(model, writer, every=1) as diag:
            for step in range(4):
                model(torch.randn(batch, 8)).sum().backward()
                diag.step(step)
    writer.close()
    messages = _diag_warnings(record)
    assert len(messages) == 1 and "injected failure" in messages[0], messages
    s = read(tmp_path)
    assert s["grad_norm"].steps.tolist() == [0, 1, 2, 3]  # the rest of the diagnostics still work
    assert "act" not in s["act_mean"].layers  # the failing site is missing, the others are there
    assert "gelu()" in s["act_mean"].layers
    assert _no_hooks(model)


def test_a_failing_reduction_in_step_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    def broken(plan, tensors, device):
        raise ValueError("injected reduction failure")

    monkeypatch.setattr(reductions.Plan, "norms_and_max_abs", broken)
    model = _Small()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Diagnostics(model, writer, every=1, optimizer=opt) as diag:
            for step in range(4):
                opt.zero_grad()
                model(torch.randn(2, 8)).sum().backward()
                diag.step(step)
                opt.step()
    writer.close()
    messages = _diag_warnings(record)
    assert len(messages) == 1 and "injected reduction failure" in messages[0], messages
    assert "update_ratio" in read(tmp_path)  # measured outside the failing part


def test_torch_compile_is_silent_and_captures_activation_modules(tmp_path):
    model = _Small()
    compiled = torch.compile(model, backend="eager")  # dynamo without inductor: quick on the CPU
    writer = SummaryWriter(str(tmp_path))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        diag = Diagnostics(compiled, writer, every=1)
        for step in range(3):
            compiled(torch.randn(2, 8)).sum().backward()
            diag.step(step)
        diag.close()
    writer.close()
    assert _diag_warnings(record) == []
    assert _no_hooks(model)
    s = read(tmp_path)
    assert s["grad_norm"].layers == ["a.weight", "a.bias", "b.weight", "b.bias"]  # names of the original module
    assert s["grad_norm"].steps.tolist() == [0, 1, 2]
    # The nn.ReLU module is hooked; F.gelu and torch.tanh inside forward are not (README "Compiled models").
    assert s["act_mean"].layers == ["act"] and s["act_mean"].steps.tolist() == [0, 1, 2]


def test_module_compile_in_place_is_detected_too(tmp_path):
    model = _Small()
    model.compile(backend="eager")  # nothing is compiled until it runs
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnosticsWarning)
        diag = Diagnostics(model, logdir=str(tmp_path))
    assert list(model.act._forward_hooks) and not model._forward_pre_hooks  # module hooks, no root hooks
    diag.close()
    assert _no_hooks(model)


def test_activations_false_on_a_compiled_model_is_silent(tmp_path):
    compiled = torch.compile(_Small(), backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnosticsWarning)
        Diagnostics(compiled, logdir=str(tmp_path), activations=False).close()
