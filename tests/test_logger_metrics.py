"""Each metric against a hand computation, read back from the event files (the real path)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _logger_helpers import at, close, read, recorded, unit_dead_fraction
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics, reductions
from tb_diag_plugin.reading import LocalReader


@pytest.fixture(params=["flat", "stream", "foreach"])
def reduction_path(request):
    """Every way of reducing parameters (`Diagnostics(impl=)`): flattened into one buffer (many small
    tensors, as in these tests' models), one BLAS pass per CPU tensor, one fused call per group."""
    return request.param


def _set(module: nn.Module, **values) -> None:
    with torch.no_grad():
        for name, v in values.items():
            getattr(module, name).copy_(torch.tensor(v, dtype=torch.float32))


def test_gradient_and_weight_norms_match_a_hand_derived_gradient(tmp_path, reduction_path):
    # One linear layer, loss = 0.5 * sum((xW^T + b - t)^2) / N: dL/dW = r^T x / N, dL/db = sum(r) / N.
    W = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    b = np.array([0.1, -0.2])
    x = np.array([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0], [3.0, 0.5, -2.0], [-1.0, 0.0, 0.5]])
    t = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 2.0], [0.5, 0.5]])
    model = nn.Sequential(nn.Linear(3, 2))
    _set(model[0], weight=W, bias=b)
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1, impl=reduction_path) as diag:
        y = model(torch.tensor(x, dtype=torch.float32))
        loss = 0.5 * ((y - torch.tensor(t, dtype=torch.float32)) ** 2).sum() / 4
        loss.backward()
        diag.step(0, loss=loss)
    writer.close()

    r = x @ W.T + b - t
    gW, gb = r.T @ x / 4, r.sum(0) / 4
    s = read(tmp_path)
    assert close(at(s, "grad_norm", "0.weight", 0), math.sqrt((gW**2).sum()))
    assert close(at(s, "grad_norm", "0.bias", 0), math.sqrt((gb**2).sum()))
    assert close(at(s, "grad_max_abs", "0.weight", 0), np.abs(gW).max())
    assert close(at(s, "grad_max_abs", "0.bias", 0), np.abs(gb).max())
    assert at(s, "grad_nonfinite", "0.weight", 0) == 0 and at(s, "grad_nonfinite", "0.bias", 0) == 0
    assert close(at(s, "weight_norm", "0.weight", 0), math.sqrt((W**2).sum()))
    assert close(at(s, "weight_norm", "0.bias", 0), math.sqrt((b**2).sum()))
    assert close(at(s, "grad_norm_total", "", 0), math.sqrt((gW**2).sum() + (gb**2).sum()))
    assert close(at(s, "loss", "total", 0), 0.5 * (r**2).sum() / 4)
    assert s["grad_norm"].layers == ["0.weight", "0.bias"]


def test_nonfinite_gradients_are_counted_and_params_without_grad_are_left_out(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(3, 3), "unused": nn.Linear(3, 3)})
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1) as diag:
        for step in range(2):
            model.zero_grad()
            model["a"](torch.randn(4, 3)).sum().backward()
            g = model["a"].weight.grad
            if step == 0:  # two NaN and two infinite elements
                g[0, 0], g[1, 1], g[2, 2], g[2, 0] = float("nan"), float("inf"), float("-inf"), float("nan")
            else:  # only +/-inf
                g[0, 1], g[1, 2] = float("inf"), float("-inf")
            diag.step(step)
    writer.close()

    s = read(tmp_path)
    assert s["grad_norm"].layers == ["a.weight", "a.bias"]  # `unused` has no .grad
    assert not recorded(s, "grad_norm", "unused.weight", 0)
    assert recorded(s, "weight_norm", "unused.weight", 0) and recorded(s, "weight_norm", "unused.bias", 1)
    assert at(s, "grad_nonfinite", "a.weight", 0) == 4
    assert at(s, "grad_nonfinite", "a.bias", 0) == 0
    assert math.isnan(at(s, "grad_norm", "a.weight", 0))
    assert math.isnan(at(s, "grad_max_abs", "a.weight", 0))
    assert math.isnan(at(s, "grad_norm_total", "", 0))
    assert math.isfinite(at(s, "grad_norm", "a.bias", 0))
    assert at(s, "grad_nonfinite", "a.weight", 1) == 2
    assert at(s, "grad_norm", "a.weight", 1) == math.inf
    assert at(s, "grad_max_abs", "a.weight", 1) == math.inf
    assert at(s, "grad_norm_total", "", 1) == math.inf


def test_update_ratio_with_sgd_and_learning_rate_per_param_group(tmp_path, reduction_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.01}]
    )
    expected: dict[tuple[str, int], float] = {}
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1, impl=reduction_path, optimizer=opt) as diag:
        for step in range(3):
            if step == 2:
                opt.param_groups[1]["lr"] = 0.5
            opt.zero_grad()
            model(torch.randn(8, 3)).pow(2).mean().backward()
            for group in opt.param_groups:
                for p in group["params"]:
                    name = next(n for n, q in model.named_parameters() if q is p)
                    # Plain SGD: w' = w - lr * g, so |dw| / |w| = lr * |g| / |w|.
                    expected[(name, step)] = group["lr"] * p.grad.norm().item() / p.detach().norm().item()
            diag.step(step)
            opt.step()
    writer.close()

    s = read(tmp_path)
    assert s["learning_rate"].layers == ["group0", "group1"]
    assert [at(s, "learning_rate", "group0", k) for k in range(3)] == pytest.approx([0.1, 0.1, 0.1])
    assert [at(s, "learning_rate", "group1", k) for k in range(3)] == pytest.approx([0.01, 0.01, 0.5])
    for (name, step), want in expected.items():
        assert close(at(s, "update_ratio", name, step), want, rel=1e-4), (name, step)


def _sgd_ratio(p: torch.Tensor, lr: float) -> float:
    """Plain SGD: w' = w - lr * g, so |dw| / |w| = lr * |g| / |w| (taken just before opt.step())."""
    return lr * p.grad.norm().item() / p.detach().norm().item()


def test_update_ratio_reuses_step_weight_norms_for_a_subset_of_parameters_with_gradients(tmp_path, reduction_path):
    # `include` leaves `skip` out; `unused` has no gradient: the reused norms are picked by name.
    torch.manual_seed(0)
    model = nn.ModuleDict({"skip": nn.Linear(3, 3), "unused": nn.Linear(3, 3), "a": nn.Linear(3, 2)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected: dict[tuple[str, int], float] = {}
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1, impl=reduction_path, optimizer=opt, include=["a.*", "unused.*"]) as diag:
        for step in range(2):
            opt.zero_grad()
            model["a"](model["skip"](torch.randn(8, 3))).pow(2).mean().backward()
            for name in ("a.weight", "a.bias"):
                expected[(name, step)] = _sgd_ratio(model.get_parameter(name), 0.1)
            diag.step(step)
            opt.step()
    writer.close()

    s = read(tmp_path)
    assert s["update_ratio"].layers == ["a.weight", "a.bias"]
    for (name, step), want in expected.items():
        assert close(at(s, "update_ratio", name, step), want, rel=1e-4), (name, step)


def test_update_ratio_sees_weights_changed_between_step_and_optimizer_step(tmp_path, reduction_path):
    # The norms step() took are stale once a weight is modified in place or replaced:
    # the ratio must use the weights the optimizer steps from.
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected: dict[tuple[str, int], float] = {}
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1, impl=reduction_path, optimizer=opt) as diag:
        for step in range(2):
            opt.zero_grad()
            model(torch.randn(8, 3)).pow(2).mean().backward()
            diag.step(step)
            with torch.no_grad():
                if step == 0:
                    model.weight.mul_(3.0)  # in place: the version counter moves
                else:
                    model.weight.data = model.weight.data * 3.0  # replaced: the data pointer moves
            for name, p in model.named_parameters():
                expected[(name, step)] = _sgd_ratio(p, 0.1)
            opt.step()
    writer.close()

    s = read(tmp_path)
    for (name, step), want in expected.items():
        assert close(at(s, "update_ratio", name, step), want, rel=1e-4), (name, step)


def test_single_param_group_learning_rate_has_an_empty_layer(tmp_path):
    model = nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1, optimizer=opt) as diag:
        model(torch.ones(1, 2)).sum().backward()
        diag.step(0)
        opt.step()
    writer.close()
    s = read(tmp_path)
    assert s["learning_rate"].layers == [""]
    assert close(at(s, "learning_rate", "", 0), 3e-4)


def test_update_ratio_of_zero_weights_is_nan_not_huge(tmp_path, reduction_path):
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1, impl=reduction_path, optimizer=opt) as diag:
        model(torch.ones(3, 2)).sum().backward()
        diag.step(0)
        opt.step()
    writer.close()
    s = read(tmp_path)
    assert math.isnan(at(s, "update_ratio", "bias", 0))
    assert math.isfinite(at(s, "update_ratio", "weight", 0))


class _Acts(nn.Module):
    """A ReLU module after a linear layer, a functional ReLU after a 1x1 conv, sigmoid and tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 4)
        self.conv = nn.Conv2d(1, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x, img, z):
        a = self.relu(self.lin(x))
        c = F.relu(self.conv(img))
        s = torch.sigmoid(z * self.lin.bias.sum() * 0 + z)  # depends on a parameter, value z
        t = torch.tanh(z)
        return a.sum() + c.sum() + s.sum() + t.sum()


def test_dead_fraction_saturation_and_moments_match_a_hand_computation(tmp_path):
    W = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    b = np.array([0.0, -0.5, 0.0, 0.0])
    x = np.array([[1.0, -1.0], [2.0, -3.0]])
    conv_w = np.array([1.0, -1.0, 0.0, 1.0]).reshape(4, 1, 1, 1)
    conv_b = np.array([0.0, 0.0, 0.0, -1.0])
    img = np.abs(np.random.default_rng(0).normal(size=(2, 1, 3, 3))) + 0.1
    z = np.array([-10.0, -4.4, -4.3, 0.0, 2.1, 2.2, 4.3, 4.4, 10.0])
    model = _Acts()
    _set(model.lin, weight=W, bias=b)
    _set(model.conv, weight=conv_w, bias=conv_b)
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1) as diag:
        out = model(*(torch.tensor(a, dtype=torch.float32) for a in (x, img, z)))
        out.backward()
        diag.step(0)
    writer.close()

    relu_lin = np.maximum(x @ W.T + b, 0)  # (N, F): a unit is a feature
    relu_conv = np.maximum(img * conv_w.reshape(1, 4, 1, 1) + conv_b.reshape(1, 4, 1, 1), 0)  # a unit is a channel
    sig, tanh = 1 / (1 + np.exp(-z)), np.tanh(z)
    s = read(tmp_path)
    assert s["dead_fraction"].layers == ["relu", "relu()"]
    assert s["saturation"].layers == ["sigmoid()", "tanh()"]
    assert at(s, "dead_fraction", "relu", 0) == unit_dead_fraction(relu_lin) == 0.75
    # Per channel: channels 1 (negative) and 2 (zero) are dead; 3 is positive somewhere. Per element it would differ.
    assert unit_dead_fraction(relu_conv) == 0.5 and (relu_conv <= 0).mean() != 0.5
    assert at(s, "dead_fraction", "relu()", 0) == 0.5
    # Documented thresholds: derivative below 5 % of its peak.
    sat_sig = np.mean((sig <= reductions.SIGMOID_TAIL) | (sig >= 1 - reductions.SIGMOID_TAIL))
    sat_tanh = np.mean(np.abs(tanh) >= reductions.TANH_TAIL)
    assert sat_sig == pytest.approx(4 / 9) and sat_tanh == pytest.approx(7 / 9)
    assert close(at(s, "saturation", "sigmoid()", 0), sat_sig)
    assert close(at(s, "saturation", "tanh()", 0), sat_tanh)
    for site, y in (("relu", relu_lin), ("relu()", relu_conv), ("sigmoid()", sig), ("tanh()", tanh)):
        assert close(at(s, "act_mean", site, 0), y.mean(), rel=1e-5, abs_=1e-6), site
        assert close(at(s, "act_std", site, 0), y.std(ddof=1), rel=1e-4, abs_=1e-6), site
    assert s["act_mean"].layer_types == ["ReLU", "F.relu", "F.sigmoid", "F.tanh"]


def test_saturation_thresholds_are_five_percent_of_the_peak_derivative():
    y = reductions.SIGMOID_TAIL
    assert y * (1 - y) == pytest.approx(0.05 * 0.25)
    assert 1 - reductions.TANH_TAIL**2 == pytest.approx(0.05)
    assert reductions.SIGMOID_TAIL == pytest.approx(0.012661, abs=1e-6)
    assert reductions.TANH_TAIL == pytest.approx(0.974679, abs=1e-6)


def test_transformer_shaped_outputs_count_units_on_the_last_dimension(tmp_path):
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    x = torch.randn(2, 7, 3)
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1) as diag:
        out = model(x)
        out.sum().backward()
        diag.step(0)
    writer.close()
    want = unit_dead_fraction(out.detach().numpy(), unit_axis=2)
    assert at(read(tmp_path), "dead_fraction", "1", 0) == pytest.approx(want)


def test_loss_components_and_per_sample_spread(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1) as diag:
        ce = F.cross_entropy(model(x), y, reduction="none")
        l2 = 1e-2 * sum((p * p).sum() for p in model.parameters())
        loss = ce.mean() + l2
        loss.backward()
        diag.step(0, loss=loss, losses={"ce": ce, "l2": l2, "const": 3, "np": np.float64(0.25)})
    writer.close()

    per_sample = ce.detach().numpy().astype(np.float64)
    s = read(tmp_path)
    assert s["loss"].layers == ["total", "ce", "l2", "const", "np"]
    assert close(at(s, "loss", "total", 0), loss.item())
    assert close(at(s, "loss", "ce", 0), per_sample.mean())
    assert close(at(s, "loss", "l2", 0), l2.item())
    assert at(s, "loss", "const", 0) == 3.0 and at(s, "loss", "np", 0) == 0.25
    want = {
        "loss_min": per_sample.min(),
        "loss_p05": np.quantile(per_sample, 0.05),
        "loss_p25": np.quantile(per_sample, 0.25),
        "loss_p50": np.quantile(per_sample, 0.5),
        "loss_p75": np.quantile(per_sample, 0.75),
        "loss_p95": np.quantile(per_sample, 0.95),
        "loss_max": per_sample.max(),
    }
    for metric, value in want.items():
        assert s[metric].layers == ["ce"]  # only per-sample components have a spread
        assert close(at(s, metric, "ce", 0), value), metric


def test_structure_is_written_once_with_the_module_tree(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1) as diag:
        for step in range(3):
            model(torch.randn(2, 3)).sum().backward()
            diag.step(step)
    writer.close()
    doc = LocalReader(str(tmp_path)).structure(".")
    modules = {m["name"]: m for m in doc["modules"]}
    assert modules[""]["num_params"] == 3 * 4 + 4 + 4 + 1
    assert modules["0"]["type"] == "Linear"
    assert [p["shape"] for p in modules["0"]["params"]] == [[4, 3], [4]]
    assert modules["1"]["sites"] == [{"name": "1", "type": "ReLU", "kind": "relu"}]


@pytest.mark.parametrize("n", [1, 2, 3, 10, 33])
def test_spread_is_numpy_quantile(n):
    v = torch.randn(n, generator=torch.Generator().manual_seed(n))
    want = [v.min().item(), *np.quantile(v.double().numpy(), reductions.QUANTILES), v.max().item()]
    np.testing.assert_allclose(reductions.spread(v).numpy(), want, rtol=1e-6, atol=1e-6)


def test_spread_of_non_finite_per_sample_losses():
    inf, nan = math.inf, math.nan
    np.testing.assert_array_equal(
        reductions.spread(torch.tensor([1.0, inf, 2.0])).numpy(),
        np.array([1.0, 1.1, 1.5, 2.0, inf, inf, inf], dtype=np.float32),
    )
    assert torch.isnan(reductions.spread(torch.tensor([1.0, nan, 2.0]))).all()


def test_norms_of_mixed_dtypes_and_empty_tensors():
    tensors = [torch.tensor([3.0, -4.0]), torch.zeros(0), torch.tensor([-2.0], dtype=torch.float64),
               torch.tensor([1.0, -8.0], dtype=torch.bfloat16)]
    cpu = torch.device("cpu")
    np.testing.assert_allclose(reductions.grouped_norms(tensors, cpu).numpy(), [5.0, 0.0, 2.0, math.sqrt(65)],
                               rtol=1e-3)
    np.testing.assert_array_equal(reductions.max_abs(tensors, cpu).numpy(), [4.0, 0.0, 2.0, 8.0])


def test_fused_norms_and_max_abs_match_the_separate_reductions():
    # CPU float32 (the fused path), with NaN, inf, a 0-d tensor and a non-contiguous view (the general path).
    inf, nan = math.inf, math.nan
    cpu = torch.device("cpu")
    fused = [torch.tensor([[3.0, -4.0], [0.0, 0.0]]), torch.tensor(-2.5), torch.tensor([1.0, -inf]),
             torch.tensor([nan, 1.0])]
    general = fused + [torch.arange(6.0).reshape(2, 3).t()]
    for tensors in (fused, general):
        norms, biggest = reductions.norms_and_max_abs(tensors, cpu)
        np.testing.assert_allclose(norms.numpy(), reductions.grouped_norms(tensors, cpu).numpy(), rtol=1e-6)
        np.testing.assert_array_equal(biggest.numpy(), reductions.max_abs(tensors, cpu).numpy())
    norms, biggest = reductions.norms_and_max_abs(general, cpu)
    np.testing.assert_allclose(norms.numpy(), [5.0, 2.5, inf, nan, math.sqrt(55)], rtol=1e-6)
    np.testing.assert_array_equal(biggest.numpy(), [4.0, 2.5, inf, nan, 5.0])


def test_subtract_norms_updates_the_buffers_and_returns_the_norms_of_the_difference():
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float64, torch.bfloat16):  # dot on CPU float32/64, foreach otherwise
        buffers = [torch.tensor([4.0, 1.0], dtype=dtype), torch.tensor([[2.0]], dtype=dtype)]
        values = [torch.tensor([1.0, 5.0], dtype=dtype), torch.tensor([[2.0]], dtype=dtype)]
        norms = reductions.subtract_norms_(buffers, values, cpu)
        assert norms.dtype == torch.float32
        np.testing.assert_allclose(norms.numpy(), [5.0, 0.0])
        assert buffers[0].tolist() == [3.0, -4.0] and buffers[1].tolist() == [[0.0]]


def test_flattened_reductions_match_the_per_tensor_ones():
    """Many small tensors are flattened into one buffer and reduced by segment; NaN, inf, empty,
    0-d and non-contiguous tensors give what reducing them one at a time gives."""
    inf, nan = math.inf, math.nan
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    cases = [
        [torch.tensor([[3.0, -4.0], [0.0, 0.0]]), torch.tensor(-2.5), torch.tensor([1.0, -inf]),
         torch.tensor([nan, 1.0]), torch.zeros(0), torch.arange(6.0).reshape(2, 3).t()],
        [torch.randn(n) for n in (1, 7, 300, 2, 64)],
        [torch.randn(3, 3, dtype=torch.float64), torch.tensor([-9.0], dtype=torch.float64)],
        [torch.tensor([1.0, -8.0], dtype=torch.bfloat16), torch.tensor([0.5], dtype=torch.bfloat16)],
        # shapes interleaved: the buffer holds them by shape group, the results come back in the tensors' order
        [torch.randn(2, 2) * (i + 1) if i % 3 else torch.randn(5) * (i + 1) for i in range(10)] + [torch.zeros(0)],
    ]
    for tensors in cases:
        assert reductions.choose(tensors) == "flat"
        flat_n, flat_m = reductions.norms_and_max_abs(tensors, cpu)
        flat_w = reductions.grouped_norms(tensors, cpu)
        seg = reductions.Plan(tensors).segments
        assert seg.numel() == sum(t.numel() for t in tensors)
        one_n, one_m = reductions.norms_and_max_abs(tensors, cpu, impl="foreach")
        one_w = reductions.grouped_norms(tensors, cpu, impl="foreach")
        assert flat_n.dtype == flat_m.dtype == torch.float32
        # bfloat16: one tensor at a time the norm is rounded to bfloat16; flattened it is summed in float32.
        rtol = 1e-2 if tensors[0].dtype == torch.bfloat16 else 1e-6
        np.testing.assert_allclose(flat_n.numpy(), one_n.numpy(), rtol=rtol)
        np.testing.assert_allclose(flat_w.numpy(), one_w.numpy(), rtol=rtol)
        np.testing.assert_array_equal(flat_m.numpy(), one_m.numpy())
        plan = reductions.Plan(tensors)
        sums = plan.segment_sums(plan.flatten(tensors).to(torch.float64))
        np.testing.assert_allclose(sums.numpy(), [float(t.double().sum()) for t in tensors], rtol=1e-6)
    # Mixed dtypes or devices, sparse or integer tensors are never flattened.
    assert reductions.choose([torch.zeros(2), torch.zeros(2, dtype=torch.float64)]) != "flat"
    assert reductions.choose([torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)]) != "flat"
    assert reductions.choose([torch.zeros(2).to_sparse(), torch.zeros(2)]) != "flat"
    assert reductions.choose([torch.zeros(2)]) != "flat"
