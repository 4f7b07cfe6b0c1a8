"""Optimizer wrappers in the plain API: accelerate's, and objects that only look like one."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _logger_helpers import at, close, read
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics, DiagnosticsWarning
from tb_diag_logger.optimizers import unwrap_optimizer

accelerate = pytest.importorskip("accelerate")


@pytest.fixture
def writer(tmp_path):
    w = SummaryWriter(str(tmp_path))
    yield w
    w.close()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_accelerate_prepared_optimizer_gets_update_ratio_measured_outside(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, opt)
    assert type(opt).__name__ == "AcceleratedOptimizer"
    writer = SummaryWriter(str(tmp_path))
    expected: dict[int, dict[str, float]] = {}
    torch.manual_seed(1)
    with Diagnostics(model, writer, every=2, optimizer=opt) as diag:
        for step in range(6):
            x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            diag.step(step, loss=loss)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
            if diag.should_log(step):
                expected[step] = {
                    n: float(torch.linalg.vector_norm(p.detach() - before[n]) / torch.linalg.vector_norm(before[n]))
                    for n, p in model.named_parameters()
                }
    writer.close()
    series = read(tmp_path)
    assert sorted(expected) == [0, 2, 4]
    for step, ratios in expected.items():
        for name, ratio in ratios.items():
            assert ratio > 0
            assert close(at(series, "update_ratio", name, step), ratio, rel=1e-4), (step, name)


class _Wrapper:
    """What accelerate, Lightning and ZeRO do: the real optimizer is `.optimizer`, possibly nested."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def step(self, closure=None):
        return self.optimizer.step(closure)


def test_nested_wrappers_unwrap_to_the_torch_optimizer():
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    assert unwrap_optimizer(_Wrapper(_Wrapper(opt))) is opt
    assert unwrap_optimizer(opt) is opt


class _Cycle:
    def __init__(self) -> None:
        self.optimizer = self


@pytest.mark.parametrize(
    "not_an_optimizer",
    [object(), "adam", _Wrapper(None), _Wrapper(_Wrapper("sgd")), _Cycle(), nn.Linear(2, 2)],
    ids=["object", "str", "wraps-None", "wraps-str", "cycle", "module"],
)
def test_a_wrapper_that_is_no_optimizer_is_a_type_error_naming_optimizer(writer, not_an_optimizer):
    with pytest.raises(TypeError, match="optimizer"):
        Diagnostics(_model(), writer, optimizer=not_an_optimizer)


class _Uninitialised(torch.optim.Optimizer):
    """Subclasses Optimizer but never ran its __init__ (accelerate's wrapper does this)."""

    def __init__(self) -> None:
        pass


def test_an_uninitialised_optimizer_subclass_is_a_type_error():
    with pytest.raises(TypeError, match="optimizer"):
        unwrap_optimizer(_Uninitialised())


class _RefusesHooks(torch.optim.SGD):
    def register_step_pre_hook(self, hook):
        raise RuntimeError("this optimizer takes no hooks")


def test_an_optimizer_refusing_hooks_costs_one_warning_and_training_goes_on(tmp_path):
    model = _model()
    opt = _RefusesHooks(model.parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Diagnostics(model, writer, every=1, optimizer=opt) as diag:
            for step in range(3):
                loss = model(torch.randn(4, 6)).square().mean()
                loss.backward()
                diag.step(step, loss=loss)
                opt.step()
                opt.zero_grad()
    writer.close()
    ours = [w for w in caught if issubclass(w.category, DiagnosticsWarning)]
    assert len(ours) == 1 and "update_ratio" in str(ours[0].message)
    series = read(tmp_path)
    assert "update_ratio" not in series
    assert close(at(series, "learning_rate", "", 2), 0.1)
