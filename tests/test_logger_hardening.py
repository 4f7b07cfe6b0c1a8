"""Hardening of the logger: bad arguments, hostile values, odd models, failing disks, interrupts."""

from __future__ import annotations

import glob
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _logger_helpers import WideModel, at, close, read, recorded
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics, DiagnosticsWarning
from tb_diag_plugin.reading import LocalReader


def _diag_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DiagnosticsWarning)]


# ----------------------------------------------------------------- arguments

@pytest.fixture
def writer(tmp_path):
    w = SummaryWriter(str(tmp_path))
    yield w
    w.close()


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"model": "not a module"}, TypeError, "model"),
        ({"model": [nn.Linear(1, 1)]}, TypeError, "model"),
        ({"every": 0}, ValueError, "every"),
        ({"every": -5}, ValueError, "every"),
        ({"every": 2.5}, TypeError, "every"),
        ({"every": True}, TypeError, "every"),
        ({"writer": object()}, TypeError, "writer"),
        ({"writer": "runs/exp"}, TypeError, "logdir"),
        ({"writer": None}, ValueError, "writer"),
        ({"writer": None, "logdir": 3}, TypeError, "logdir"),
        ({"optimizer": "sgd"}, TypeError, "optimizer"),
        ({"scaler": 65536.0}, TypeError, "scaler"),
        ({"include": 3}, TypeError, "include"),
        ({"exclude": [None]}, TypeError, "exclude"),
        ({"write_rank": -1}, ValueError, "write_rank"),
    ],
)
def test_wrong_constructor_arguments_name_the_argument(writer, kwargs, error, name):
    args = {"model": nn.Linear(2, 2), "writer": writer}
    args.update(kwargs)
    model = args.pop("model")
    w = args.pop("writer")
    with pytest.raises(error, match=name):
        Diagnostics(model, w, **args)


def test_writer_and_logdir_together_are_refused(writer, tmp_path):
    with pytest.raises(ValueError, match="writer or logdir"):
        Diagnostics(nn.Linear(1, 1), writer, logdir=str(tmp_path))


@pytest.mark.parametrize(
    "call, error, name",
    [
        (lambda d: d.step("3"), TypeError, "step"),
        (lambda d: d.step(1.5), TypeError, "step"),
        (lambda d: d.step(-1), ValueError, "step"),
        (lambda d: d.step(4), ValueError, "step must increase"),
        (lambda d: d.step(5), ValueError, "step must increase"),
        (lambda d: d.step(6, loss=torch.ones(2, 2)), ValueError, "loss"),
        (lambda d: d.step(6, loss="0.3"), TypeError, "loss"),
        (lambda d: d.step(6, losses={"ce": torch.ones(2, 3)}), ValueError, r"losses\['ce'\]"),
        (lambda d: d.step(6, losses={"ce": "high"}), TypeError, r"losses\['ce'\]"),
        (lambda d: d.step(6, losses={"ce": None}), TypeError, r"losses\['ce'\]"),
        (lambda d: d.step(6, losses={"ce": torch.arange(4)}), TypeError, r"losses\['ce'\]"),
        (lambda d: d.step(6, losses=[1.0, 2.0]), TypeError, "losses"),
        (lambda d: d.step(6, losses={3: 1.0}), TypeError, "losses"),
        (lambda d: d.step(6, loss=1.0, losses={"total": 1.0}), ValueError, "total"),
    ],
)
def test_wrong_step_arguments_name_the_argument_and_change_nothing(writer, call, error, name):
    model = nn.Linear(2, 2)
    diag = Diagnostics(model, writer, every=1)
    model(torch.ones(1, 2)).sum().backward()
    diag.step(5)
    with pytest.raises(error, match=name):
        call(diag)
    diag.step(6, loss=1.0)  # the failed call consumed nothing
    diag.close()


# ------------------------------------------------------ hostile values, odd models

def test_nonfinite_losses_and_gradients_are_recorded_faithfully(tmp_path):
    # Sigmoid, not ReLU: a ReLU unit dead for the whole batch would stop the NaN
    # (its gradient is masked to 0), making the count below depend on the input.
    model = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 1))
    writer = SummaryWriter(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnosticsWarning)
        with Diagnostics(model, writer, every=1) as diag:
            out = model(torch.randn(4, 3))
            loss = out.sum() * float("nan")
            loss.backward()
            per_sample = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
            diag.step(0, loss=loss, losses={"inf": float("inf"), "neg": -math.inf, "ps": per_sample})
    writer.close()
    s = read(tmp_path)
    assert math.isnan(at(s, "loss", "total", 0))
    assert at(s, "loss", "inf", 0) == math.inf and at(s, "loss", "neg", 0) == -math.inf
    assert math.isnan(at(s, "loss", "ps", 0)) and math.isnan(at(s, "loss_p50", "ps", 0))
    for name, p in model.named_parameters():
        assert at(s, "grad_nonfinite", name, 0) == p.numel(), name  # every element is NaN
        assert math.isnan(at(s, "grad_norm", name, 0))
    assert math.isnan(at(s, "grad_norm_total", "", 0))


def test_all_zero_gradients_and_frozen_layers(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1, optimizer=opt) as diag:
        (model(torch.randn(2, 3)).sum() * 0.0).backward()
        diag.step(0)
        opt.step()
    writer.close()
    s = read(tmp_path)
    assert s["grad_norm"].layers == ["1.weight", "1.bias"]  # the frozen layer has no gradient
    assert s["weight_norm"].layers == ["0.weight", "0.bias", "1.weight", "1.bias"]
    for name in ("1.weight", "1.bias"):
        assert at(s, "grad_norm", name, 0) == 0.0 and at(s, "grad_max_abs", name, 0) == 0.0
        assert at(s, "grad_nonfinite", name, 0) == 0.0
        assert at(s, "update_ratio", name, 0) == 0.0
    assert at(s, "grad_norm_total", "", 0) == 0.0
    assert not recorded(s, "update_ratio", "0.weight", 0)


def test_shared_parameters_are_recorded_once(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False))
    model[2].weight = model[0].weight  # tied
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1) as diag:
        model(torch.randn(3, 4)).sum().backward()
        diag.step(0)
    writer.close()
    s = read(tmp_path)
    assert s["grad_norm"].layers == ["0.weight"]
    assert close(at(s, "grad_norm", "0.weight", 0), model[0].weight.grad.norm().item())


def test_empty_models_work(tmp_path):
    class Parameterless(nn.Module):
        def forward(self, x):
            return torch.sigmoid(F.relu(x))

    for i, model in enumerate([nn.Module(), nn.Sequential(), Parameterless()]):
        logdir = tmp_path / str(i)
        writer = SummaryWriter(str(logdir))
        with warnings.catch_warnings():
            warnings.simplefilter("error", DiagnosticsWarning)
            with Diagnostics(model, writer, every=1) as diag:
                for step in range(2):
                    x = torch.randn(3, 2, requires_grad=True)
                    loss = model(x).sum() if i == 2 else x.sum()
                    loss.backward()
                    diag.step(step, loss=loss)
        writer.close()
        s = read(logdir)
        assert "grad_norm" not in s and "weight_norm" not in s
        assert s["loss"].steps.tolist() == [0, 1]
        if i == 2:
            assert s["act_mean"].layers == ["relu()", "sigmoid()"]


class _CountTorchCalls(TorchFunctionMode):
    """Counts the torch functions called inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_two_thousand_parameter_tensors_and_a_thousand_activation_sites(tmp_path):
    model = WideModel(1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=2, optimizer=opt) as diag:
        calls = []  # torch functions each step() called: work is counted, not timed
        for step in range(3):
            opt.zero_grad()
            model(torch.randn(4, 2)).backward()
            with _CountTorchCalls() as counted:
                diag.step(step)
            calls.append(counted.n)
            opt.step()
    writer.close()
    s = read(tmp_path)
    assert len(s["grad_norm"].layers) == 2000 and len(s["update_ratio"].layers) == 2000
    assert len(s["dead_fraction"].layers) == 1000
    assert s["dead_fraction"].layers[:2] == ["blocks.0.relu()", "blocks.1.relu()"]
    assert s["grad_norm"].steps.tolist() == [0, 2]
    # A step that is not logged does no per-tensor work (a logged one does thousands of calls).
    assert calls[1] < 20 and calls[0] > 2000 and calls[2] > 2000, calls
    assert close(at(s, "grad_norm", "blocks.999.fc.bias", 2), model.blocks[999].fc.bias.grad.norm().item())


# ------------------------------------------------------------ writer and disk

def test_the_user_closing_the_writer_first_loses_nothing(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnosticsWarning)
        diag = Diagnostics(model, writer, every=1, optimizer=opt)
        for step in range(3):
            opt.zero_grad()
            model(torch.randn(2, 2)).sum().backward()
            diag.step(step)
            opt.step()
        writer.close()  # before diag.close(): the update ratio of step 2 is still pending
        diag.close()
    s = read(tmp_path)
    assert s["grad_norm"].steps.tolist() == [0, 1, 2]
    assert s["update_ratio"].steps.tolist() == [0, 1, 2]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the writer's own thread
def test_the_logdir_removed_mid_run_is_one_warning_and_training_goes_on(tmp_path):
    logdir = tmp_path / "run"
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    writer = SummaryWriter(str(logdir))
    trained = 0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        diag = Diagnostics(model, writer, every=1)
        for step in range(6):
            model(torch.randn(2, 2)).sum().backward()
            diag.step(step)
            trained += 1
            if step == 2:
                writer.flush()
                shutil.rmtree(logdir)
        diag.close()
    assert trained == 6
    messages = _diag_warnings(record)
    assert len(messages) == 1 and "writing the event file" in messages[0], messages


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the writer's own thread
def test_a_full_disk_is_one_warning_and_training_goes_on(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    writer = SummaryWriter(str(tmp_path))
    writer.flush()
    (event_file,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    os.remove(event_file)
    os.symlink("/dev/full", event_file)  # every append now fails with ENOSPC
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Diagnostics(model, writer, every=1) as diag:
            for step in range(4):
                model(torch.randn(2, 2)).sum().backward()
                diag.step(step)
    messages = _diag_warnings(record)
    assert len(messages) == 1 and "No space left" in messages[0], messages


# ----------------------------------------------------------------- interrupts

def test_keyboard_interrupt_while_writing_propagates_and_the_file_stays_readable(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    writer = SummaryWriter(str(tmp_path))
    file_writer = writer._get_file_writer()
    real_add = file_writer.add_summary
    calls = {"n": 0}

    def add_summary(*args, **kwargs):  # Ctrl-C arrives while step 2 is written (step 0 wrote two events)
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_add(*args, **kwargs)

    file_writer.add_summary = add_summary
    diag = Diagnostics(model, writer, every=1)
    with pytest.raises(KeyboardInterrupt):
        for step in range(10):
            model(torch.randn(2, 2)).sum().backward()
            diag.step(step)
    assert step == 2
    # The training loop may go on (a notebook): the logger is in a consistent state.
    model(torch.randn(2, 2)).sum().backward()
    diag.step(3)
    diag.close()
    writer.close()
    s = read(tmp_path)
    assert s["grad_norm"].steps.tolist() == [0, 1, 3]
    assert s["act_mean"].present.all() and s["grad_norm"].present.all()


SIGINT_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from torch.utils.tensorboard import SummaryWriter
    from tb_diag_logger import Diagnostics

    torch.set_num_threads(1)
    # Many small tensors: most of each iteration is spent inside Diagnostics.step().
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(50)])
    writer = SummaryWriter(sys.argv[1])
    diag = Diagnostics(model, writer, every=1)  # no close(), no `with`: the interrupt ends the program
    step = 0
    while True:
        model(torch.randn(2, 4)).sum().backward()
        diag.step(step, loss=float(step))
        model.zero_grad()
        if step == 20:
            print("ready", flush=True)
        step += 1
    """
)


def test_sigint_during_training_leaves_a_readable_event_file_with_whole_steps(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SIGINT_SCRIPT)
    logdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(logdir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    reader = LocalReader(str(logdir))
    s = reader.series(".")
    steps = s["grad_norm"].steps
    assert steps.size > 20  # everything written before the interrupt is there
    assert steps.tolist() == list(range(steps.size))  # whole steps only, in order
    assert s["grad_norm"].present.all() and s["dead_fraction"].present.all()
    np.testing.assert_array_equal(s["loss"].layer("total"), steps.astype(np.float32))
    assert not reader.index["."].problems


def test_sparse_gradients_and_integer_parameters(tmp_path):
    class WithOddParams(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 3, sparse=True)
            self.counter = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)

        def forward(self, idx):
            return self.emb(idx).sum()

    model = WithOddParams()
    opt = torch.optim.SGD(model.emb.parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnosticsWarning)
        with Diagnostics(model, writer, every=1, optimizer=opt) as diag:
            model(torch.tensor([1, 2, 2, 7])).backward()
            dense = model.emb.weight.grad.to_dense()
            diag.step(0)
            opt.step()
    writer.close()
    s = read(tmp_path)
    assert s["weight_norm"].layers == ["emb.weight"]  # the integer parameter is left out
    assert close(at(s, "grad_norm", "emb.weight", 0), dense.norm().item())  # row 2 counted twice
    assert at(s, "grad_max_abs", "emb.weight", 0) == 2.0
    assert recorded(s, "update_ratio", "emb.weight", 0)


def test_write_rank_without_torch_distributed_warns_that_nothing_is_written(tmp_path):
    model = nn.Linear(2, 1)
    with pytest.warns(DiagnosticsWarning, match="write_rank=1"):
        with Diagnostics(model, logdir=str(tmp_path), write_rank=1, every=1) as diag:
            model(torch.ones(1, 2)).sum().backward()
            diag.step(0)
    assert not glob.glob(str(tmp_path / "events.*"))


def test_many_forwards_before_a_step_stay_bounded_and_add_up(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    writer = SummaryWriter(str(tmp_path))
    diag = Diagnostics(model, writer, every=1)
    outputs = []
    for _ in range(300):  # e.g. a long accumulation, or a loop that forgot step()
        outputs.append(model(torch.randn(3, 2)).detach())
    site = diag._capture.sites["1"]
    assert len(site.sums) <= 64 and site.count == 300 * 3 * 2
    model[0].weight.grad = torch.zeros(2, 2)
    diag.step(0)
    diag.close()
    writer.close()
    everything = torch.cat(outputs).numpy()
    s = read(tmp_path)
    assert close(at(s, "act_mean", "1", 0), everything.mean(), abs_=1e-6)
    assert close(at(s, "act_std", "1", 0), everything.std(ddof=1), rel=1e-4)
