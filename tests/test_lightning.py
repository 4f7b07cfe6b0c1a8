"""`integrations.lightning.DiagnosticsCallback` on real Lightning 2.x trainings (tiny CPU models).

Every value is checked against what the test computes outside, from the
batches and weights the LightningModule saw.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _logger_helpers import at, close, read, unit_dead_fraction
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from tb_diag_logger import DiagnosticsWarning  # noqa: E402
from tb_diag_logger.integrations.lightning import DiagnosticsCallback  # noqa: E402
from tb_diag_plugin.findings import analyze  # noqa: E402


def _loader(n: int = 12, batch: int = 2, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _trainer(tmp_path, callback, **kw) -> pl.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=TensorBoardLogger(str(tmp_path), name="run", version=0),
        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, **kw,
    )


class Net(pl.LightningModule):
    """fc1 -> nn.ReLU module -> fc2 -> F.relu called in training_step itself -> fc3; plain SGD."""

    def __init__(self, dead_bias: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.fc2, self.fc3 = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.Linear(6, 1)
        with torch.no_grad():
            self.fc1.bias[:3] -= 50.0 if not dead_bias else 0.0  # three units of `act` dead for every sample
            self.fc1.bias -= dead_bias  # or all of them
        self.seen: list[tuple[int, dict[str, torch.Tensor], tuple, float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        weights = {n: p.detach().clone() for n, p in self.named_parameters()}
        h = self.act(self.fc1(x))
        h2 = F.relu(self.fc2(h))  # a functional activation outside any forward: the root's site "relu()"
        loss = F.mse_loss(self.fc3(h2), y)
        self.seen.append((self.trainer.global_step, weights, (x.clone(), y.clone()), loss.item()))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _hand_activations(model: Net, weights: dict[str, torch.Tensor], xs: list[torch.Tensor]) -> dict[str, tuple]:
    """(dead fraction, mean) of both ReLU sites over the micro-batches `xs`, at `weights`, without Lightning."""
    with torch.no_grad():
        x = torch.cat(xs)
        h = torch.relu(x @ weights["fc1.weight"].T + weights["fc1.bias"])
        h2 = torch.relu(h @ weights["fc2.weight"].T + weights["fc2.bias"])
    return {site: (unit_dead_fraction(v.numpy()), v.mean().item()) for site, v in (("act", h), ("relu()", h2))}


def test_accumulated_steps_record_activations_update_ratio_and_loss_as_computed_outside(tmp_path):
    model = Net()
    trainer = _trainer(tmp_path, DiagnosticsCallback(every=1), accumulate_grad_batches=2)
    trainer.fit(model, _loader())
    assert trainer.global_step == 3
    s = read(tmp_path, "run/version_0")

    by_step: dict[int, list] = {}
    for step, weights, batch, loss in model.seen:
        by_step.setdefault(step, []).append((weights, batch, loss))
    final = {n: p.detach() for n, p in model.named_parameters()}
    for step in range(3):
        micro = by_step[step]
        assert len(micro) == 2
        weights = micro[0][0]
        for site, (dead, mean) in _hand_activations(model, weights, [b[0] for _, b, _ in micro]).items():
            assert at(s, "dead_fraction", site, step) == pytest.approx(dead), (site, step)
            assert close(at(s, "act_mean", site, step), mean, rel=1e-5), (site, step)
        assert at(s, "dead_fraction", "act", step) >= 3 / 8
        # The loss of the step: the mean of its micro-batches' training_step losses.
        assert close(at(s, "loss", "total", step), (micro[0][2] + micro[1][2]) / 2, rel=1e-5)
        after = by_step[step + 1][0][0] if step + 1 in by_step else final
        for name, w in weights.items():
            want = ((after[name] - w).norm() / w.norm()).item()
            assert want > 0
            assert close(at(s, "update_ratio", name, step), want, rel=1e-4), (name, step)


def test_diagnostics_land_in_the_tensorboard_loggers_run_beside_lightnings_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = Net()
    trainer = _trainer(tmp_path, DiagnosticsCallback(every=2))
    trainer.fit(model, _loader())
    run_dir = trainer.logger.log_dir
    assert run_dir == str(tmp_path / "run" / "version_0")
    acc = EventAccumulator(run_dir)
    acc.Reload()
    assert "train_loss" in acc.Tags()["scalars"]  # Lightning's own scalar, where it always was
    s = read(tmp_path, "run/version_0")
    assert s["grad_norm"].steps.tolist() == [0, 2, 4]  # global_step, every=2 of 6 optimizer steps
    assert s["loss"].steps.tolist() == [0, 2, 4]
    for step in (0, 2, 4):
        assert close(at(s, "loss", "total", step), model.seen[step][3], rel=1e-5)
    assert len(list((tmp_path / "run" / "version_0").glob("events.out.tfevents.*"))) == 1  # one writer
    assert "training_step" not in vars(model)  # the wrapper is gone after fit


def test_a_model_whose_relus_are_all_dead_gets_a_dead_relu_finding(tmp_path):
    model = Net(dead_bias=100.0)
    trainer = _trainer(tmp_path, DiagnosticsCallback(every=1), max_steps=12)
    trainer.fit(model, _loader(n=24))
    s = read(tmp_path, "run/version_0")
    assert set(s["dead_fraction"].values[:, s["dead_fraction"].layers.index("act")]) == {1.0}
    found, _ = analyze(s)
    dead = [f for f in found if f.kind == "dead_relu"]
    assert dead and "act" in dead[0].layers and dead[0].severity == "error"


class SubmoduleNet(pl.LightningModule):
    """`training_step` calls `self.net(x)`, so the LightningModule's own forward never runs; with `through_forward`
    it calls `self(...)` on the batch's input scaled and shifted, so that the forward's input and the batch's
    differ (counting both would move the moments). Keeps, per step, the input its net saw."""

    def __init__(self, through_forward: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.through_forward = through_forward
        self.inputs: dict[int, list[np.ndarray]] = {}
        self.outputs: dict[int, list[np.ndarray]] = {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        seen = x * 10.0 - 3.0 if self.through_forward else x
        out = self(seen) if self.through_forward else self.net(seen)
        self.inputs.setdefault(self.trainer.global_step, []).append(seen.detach().double().numpy())
        self.outputs.setdefault(self.trainer.global_step, []).append(out.detach().double().numpy())
        return F.mse_loss(out, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _offset_loader() -> DataLoader:
    """Inputs of mean 5 and std 3 (so that a mean of zero or a unit std cannot pass by chance)."""
    g = torch.Generator().manual_seed(3)
    x, y = 5.0 + 3.0 * torch.randn(12, 4, generator=g), torch.randn(12, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=2, shuffle=False)


@pytest.mark.parametrize("through_forward", [False, True], ids=["self.net(x)", "self(x)"])
def test_the_input_scale_is_the_training_inputs_whether_or_not_the_modules_forward_runs(tmp_path, through_forward):
    """`self.net(x)`: the input scale comes from the batches (the root's forward never runs); `self(x)`: from the
    forward, the batches not counted as well. Either way each logged step's `input_mean`/`input_std` are
    numpy's over the inputs the net saw in that step's two accumulated batches."""
    model = SubmoduleNet(through_forward)
    trainer = _trainer(tmp_path, DiagnosticsCallback(every=1), accumulate_grad_batches=2)
    trainer.fit(model, _offset_loader())
    assert trainer.global_step == 3
    s = read(tmp_path, "run/version_0")
    assert s["input_mean"].steps.tolist() == s["input_std"].steps.tolist() == [0, 1, 2]
    for step, xs in model.inputs.items():
        assert len(xs) == 2
        x = np.concatenate(xs)
        assert close(at(s, "input_mean", "", step), x.mean(), rel=1e-5), step
        assert close(at(s, "input_std", "", step), x.std(), rel=1e-5), step
        if through_forward:  # the batch's own input has another scale: counting it too would show
            batch = (x + 3.0) / 10.0
            pooled = np.concatenate([x, batch])
            assert not close(at(s, "input_mean", "", step), pooled.mean(), rel=1e-2)


@pytest.mark.parametrize("through_forward", [False, True], ids=["self.net(x)", "self(x)"])
def test_the_logits_are_the_nets_output_whether_or_not_the_modules_forward_runs(tmp_path, through_forward):
    """`self.net(x)` never runs the LightningModule's forward; the net holds every parameter, so its output is
    the logits, as with `self(x)`: each logged step's `logit_max_abs`, `logit_min` and `logit_max` are numpy's
    over the outputs of that step's two accumulated batches, under the head's name (the last Linear)."""
    model = SubmoduleNet(through_forward)
    trainer = _trainer(tmp_path, DiagnosticsCallback(every=1), accumulate_grad_batches=2)
    trainer.fit(model, _offset_loader())
    s = read(tmp_path, "run/version_0")
    assert s["logit_max_abs"].layers == ["net.2"]
    assert s["logit_max_abs"].steps.tolist() == [0, 1, 2]
    for step, outs in model.outputs.items():
        y = np.concatenate(outs)
        assert close(at(s, "logit_max_abs", "net.2", step), np.abs(y).max(), rel=1e-5), step
        assert close(at(s, "logit_min", "net.2", step), y.min(), rel=1e-5), step
        assert close(at(s, "logit_max", "net.2", step), y.max(), rel=1e-5), step


def test_without_a_tensorboard_logger_it_writes_its_own_events_in_the_log_dir(tmp_path):
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=2, logger=False, default_root_dir=str(tmp_path),
        callbacks=[DiagnosticsCallback(every=1)], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Net(), _loader())
    s = read(tmp_path)
    assert s["grad_norm"].steps.tolist() == [0, 1]


class LbfgsNet(Net):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=3)


def test_lbfgs_records_each_step_once_from_its_first_closure_evaluation(tmp_path):
    model = LbfgsNet()
    trainer = _trainer(tmp_path, DiagnosticsCallback(every=1), max_steps=3)
    trainer.fit(model, _loader())
    s = read(tmp_path, "run/version_0")
    first: dict[int, tuple] = {}
    for step, weights, batch, loss in model.seen:
        first.setdefault(step, (weights, batch, loss))
    assert len(model.seen) > 3  # LBFGS evaluated the closure more than once per step
    final = {n: p.detach() for n, p in model.named_parameters()}
    for step in range(3):
        weights, (x, _), loss = first[step]
        assert close(at(s, "loss", "total", step), loss, rel=1e-5)
        for site, (dead, mean) in _hand_activations(model, weights, [x]).items():
            assert at(s, "dead_fraction", site, step) == pytest.approx(dead), (site, step)
            assert close(at(s, "act_mean", site, step), mean, rel=1e-5), (site, step)
        after = first[step + 1][0] if step + 1 in first else final
        for name, w in weights.items():
            assert close(at(s, "update_ratio", name, step), ((after[name] - w).norm() / w.norm()).item(), rel=1e-4)


class TwoOptimizers(pl.LightningModule):
    """Manual optimisation: `a` and `b` each with its own optimizer, stepped in turn in one training_step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 1)
        self.record: list[tuple[int, float, dict[str, float]]] = []  # (global_step, loss, update ratio by hand)

    def _stepped(self, opt, loss: torch.Tensor, module: nn.Module, prefix: str) -> None:
        step = self.trainer.global_step
        opt.zero_grad()
        self.manual_backward(loss)
        before = {f"{prefix}.{n}": p.detach().clone() for n, p in module.named_parameters()}
        opt.step()
        ratios = {n: ((p.detach() - before[f"{prefix}.{n}"]).norm() / before[f"{prefix}.{n}"].norm()).item()
                  for n, p in module.named_parameters()}
        self.record.append((step, loss.item(), {f"{prefix}.{n}": r for n, r in ratios.items()}))

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        h = F.relu(self.a(x))
        self._stepped(opt_a, h.pow(2).mean(), self.a, "a")
        out = self.b(F.relu(self.a(x)).detach())
        self._stepped(opt_b, F.mse_loss(out, y), self.b, "b")

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.Adam(self.b.parameters(), lr=0.01)


def test_manual_optimisation_with_two_optimizers_records_each_optimizer_step(tmp_path):
    model = TwoOptimizers()
    trainer = _trainer(tmp_path, DiagnosticsCallback(every=1))
    trainer.fit(model, _loader(n=6))
    assert trainer.global_step == 6  # Lightning counts every optimizer's steps
    s = read(tmp_path, "run/version_0")
    assert s["update_ratio"].steps.tolist() == list(range(6))
    for step, loss, ratios in model.record:
        assert close(at(s, "loss", "total", step), loss, rel=1e-5)
        s_ur = s["update_ratio"]
        row = s_ur.steps.tolist().index(step)
        measured = {n for j, n in enumerate(s_ur.layers) if s_ur.present[row, j]}
        assert measured == set(ratios)  # only the stepping optimizer's parameters
        for name, want in ratios.items():
            assert close(at(s, "update_ratio", name, step), want, rel=1e-4), (name, step)
    assert np.isfinite(s["dead_fraction"].values).any()  # `a.relu()`: captured in the manual training_step


def test_pytorch_lightning_package_works_the_same(tmp_path):
    ptl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.loggers import TensorBoardLogger

    class PtlNet(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.fc(torch.relu(x)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = DiagnosticsCallback(every=1)
    assert isinstance(callback, ptl.Callback) and isinstance(callback, pl.Callback)
    trainer = ptl.Trainer(
        accelerator="cpu", devices=1, max_steps=3, logger=TensorBoardLogger(str(tmp_path), name="run", version=0),
        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(PtlNet(), _loader())
    s = read(tmp_path, "run/version_0")
    assert s["update_ratio"].steps.tolist() == [0, 1, 2]
    assert s["dead_fraction"].layers == ["relu()"]


def test_bad_options_are_rejected_at_construction():
    with pytest.raises(TypeError, match="every"):
        DiagnosticsCallback(every="20")
    with pytest.raises(ValueError, match="every"):
        DiagnosticsCallback(every=0)
    with pytest.raises(TypeError, match="include"):
        DiagnosticsCallback(include=3)


def test_a_failing_diagnostic_warns_once_and_training_goes_on(tmp_path):
    model = Net()
    callback = DiagnosticsCallback(every=1)
    trainer = _trainer(tmp_path, callback)
    original = type(callback)._start

    def broken_step(self, trainer, pl_module):
        original(self, trainer, pl_module)
        self.diagnostics.step = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))

    type(callback)._start, restore = broken_step, original
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, _loader())
    finally:
        type(callback)._start = restore
    assert trainer.global_step == 6
    assert sum(issubclass(w.category, DiagnosticsWarning) and "boom" in str(w.message) for w in caught) == 1


def _readme_snippet(marker: str) -> str:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    after = text[text.index(f"<!-- snippet:{marker}") :]
    start = after.index("```python\n") + len("```python\n")
    return after[start : after.index("```\n", start)]


def test_the_readme_lightning_snippet_runs_verbatim(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code = _readme_snippet("lightning")
    assert "DiagnosticsCallback(every=5)" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md:lightning", "exec"), {"__name__": "readme_lightning"})
    run_dir = tmp_path / "runs" / "lightning" / "version_0"
    s = read(tmp_path / "runs", "lightning/version_0")
    assert s["grad_norm"].steps.tolist() == [0, 5]  # 2 epochs x 8 batches / 2 accumulated: 8 steps
    assert {"loss", "update_ratio", "dead_fraction", "learning_rate"} <= set(s)
    assert s["dead_fraction"].layers == ["net.1"]
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert "train_loss" in acc.Tags()["scalars"]


def test_ddp_on_two_cpu_processes_writes_once_with_the_whole_jobs_values(tmp_path):
    # Lightning's strategy="ddp" runs the worker script again for rank 1 (gloo); its own session, so
    # that a hang is ended by killing exactly that process group.
    worker = Path(__file__).resolve().parent / "_lightning_ddp_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("MASTER_PORT", None)
    proc = subprocess.Popen(
        [sys.executable, str(worker), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, out[-4000:]

    run_dir = tmp_path / "logs" / "run" / "version_0"
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) == 1  # rank 0 only
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    s = read(tmp_path / "logs", "run/version_0")
    assert s["loss"].steps.tolist() == [0, 1, 2, 3]  # 16 samples, 2 ranks, batch 2
    for step in range(4):
        mine = [[e for e in r["seen"] if e[0] == step][0] for r in ranks]
        weights = mine[0][1]
        h = torch.relu(torch.cat([m[2] for m in mine]) @ weights["fc1.weight"].T + weights["fc1.bias"])
        assert at(s, "dead_fraction", "act", step) == pytest.approx(unit_dead_fraction(h.numpy()))  # both ranks
        assert close(at(s, "loss", "total", step), (mine[0][3] + mine[1][3]) / 2, rel=1e-5)  # mean over ranks
        later = [e for e in ranks[0]["seen"] if e[0] == step + 1]
        after = later[0][1] if later else ranks[0]["final"]
        for name, w in weights.items():
            assert close(at(s, "update_ratio", name, step), ((after[name] - w).norm() / w.norm()).item(), rel=1e-4)


class ValidatedNet(Net):
    """Net with a validation loop that logs `val_loss` and `val_mae`, as Lightning users write it."""

    def __init__(self) -> None:
        super().__init__()
        self.val_seen: list[tuple[int, float, float]] = []

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self.fc3(F.relu(self.fc2(self.act(self.fc1(x)))))
        loss, mae = F.mse_loss(out, y), (out - y).abs().mean()
        self.log("val_loss", loss)
        self.log("val_mae", mae)
        if not self.trainer.sanity_checking:
            self.val_seen.append((self.trainer.global_step, loss.item(), mae.item()))
        return loss


def test_lightnings_validation_is_recorded_as_val_loss_at_the_global_step(tmp_path):
    model = ValidatedNet()
    trainer = _trainer(tmp_path, DiagnosticsCallback(every=2), num_sanity_val_steps=1)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, _loader(), _loader(n=2, batch=2, seed=1))  # one validation batch: its loss is the epoch's
    s = read(tmp_path, "run/version_0")
    want = {step: (loss, mae) for step, loss, mae in model.val_seen}
    assert sorted(want) == [6, 12]  # after each epoch of 6 optimizer steps; the sanity check is not recorded
    assert s["val_loss"].steps.tolist() == [6, 12]
    for step, (loss, mae) in want.items():
        assert close(at(s, "val_loss", "total", step), loss, rel=1e-5)
        assert close(at(s, "val_metric", "val_mae", step), mae, rel=1e-5)
