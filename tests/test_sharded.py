"""Sharded engines on real processes (2 ranks, gloo, CPU), compared value by value with the same model
trained unsharded on the same data: DeepSpeed ZeRO-1/2/3 (`_zero_worker.py`, and through the HF Trainer in
`_hf_zero_worker.py`), Lightning FSDP2 (`_lightning_fsdp2_worker.py`); and the HF Trainer's FSDP request, which
falls back to DDP on CPU (`_hf_fsdp_worker.py`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from _logger_helpers import at, close, read
from _zero_worker import LR, STEPS, batch, model

from tb_diag_plugin import metadata
from tb_diag_plugin.findings import ModelInfo, analyze
from tb_diag_plugin.reading import LocalReader

pytest.importorskip("deepspeed")

WORKER = os.path.join(os.path.dirname(__file__), "_zero_worker.py")
WORLD = 2
STAGES = (1, 2, 3)
# Metrics of the writing rank's own batch only (the head's logits): not those of the whole job.
# The writing rank's own values (README, "What is recorded"): the logits of its batch, and the loss it passed
# to step() on the steps between logged ones (reducing those would cost a collective at every step).
RANK_LOCAL = {"logit_lse", "logit_max_abs", "logit_min", "logit_max", "logit_rowsum_dev",
              "loss_max_between", "loss_min_between"}
# Wiring checks (collectors/wiring.py) that a sharded engine's own bookkeeping makes meaningless, so they are
# not recorded there (README, "Sharded training"): under ZeRO the engine owns the gradients (no `.grad` to
# probe) and the torch optimizer holds flat partitions (no parameters to match); under FSDP2 the gradients
# are DTensor shards, which the reset probe does not read.
NOT_UNDER_ZERO = {"grad_carried", "optimizer_orphans"}
NOT_UNDER_FSDP2 = {"grad_carried"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # DeepSpeed compiles a small C++ op on its first run (about a minute): keep it outside the repository.
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(tempfile.gettempdir(), "tb_diag_torch_extensions")
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=cache,
                PYTHONPATH=os.pathsep.join(sys.path))


def launch(worker: str, args: list[str], outdir) -> None:
    """Run WORLD ranks of `worker` (args: its arguments before RANK); a hang is killed, never blocking the suite."""
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, worker, *args, str(rank), str(WORLD), port, str(outdir)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for rank in range(WORLD)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for rank, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} of {worker} {args} failed (exit {p.returncode}):\n{err[-4000:]}"


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    launch(WORKER, [",".join(map(str, STAGES)) + ",readme"], out)
    return out


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    """The same model, optimizer and data in one process: both ranks' batches in one."""
    from tb_diag_logger import Diagnostics

    out = tmp_path_factory.mktemp("unsharded")
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    norms = {}
    with Diagnostics(m, logdir=out, every=1, optimizer=opt) as diag:
        for step in range(STEPS):
            loss = m(torch.cat([batch(r, step) for r in range(WORLD)])).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss)
            norms[step] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()])).item()
            opt.step()
    return read(out), norms


def _rank(run, stage: int, rank: int) -> dict:
    with open(os.path.join(run, f"zero{stage}-rank{rank}.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("stage", STAGES)
def test_zero_runs_on_two_ranks_with_gradients_outside_p_grad(zero_run, stage):
    """The launch is what it claims (world 2, the ZeRO optimizer of the stage), and the case is real: no
    `p.grad` after `engine.backward()`, and at stage 3 no parameter whole at `diag.step()`."""
    for rank in range(WORLD):
        r = _rank(zero_run, stage, rank)
        assert (r["world"], r["engine"], r["stage"]) == (WORLD, "DeepSpeedEngine", stage)
        assert r["optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer")
        assert all(r["grad_none"].values())
        if stage == 3:
            assert set(r["param_numel_at_step"].values()) == {0}


@pytest.mark.parametrize("stage", STAGES)
def test_zero_metrics_equal_the_unsharded_run(zero_run, unsharded, stage):
    """Every per-tensor metric (gradient norms from the partitions, weight norms and update ratios from the
    fp32 master fragments, dead fractions over both ranks' batches, the loss) equals the unsharded run's."""
    ref, _ = unsharded
    got = read(zero_run / f"zero{stage}")
    compared = set(ref) - RANK_LOCAL - NOT_UNDER_ZERO
    assert compared <= set(got), compared - set(got)
    assert not NOT_UNDER_ZERO & set(got)  # absent, never a wrong value
    assert {"grad_norm", "grad_max_abs", "weight_norm", "update_ratio", "dead_fraction", "loss"} <= compared
    for metric in sorted(compared):
        a, b = ref[metric], got[metric]
        assert a.layers == b.layers and list(a.steps) == list(b.steps), metric
        np.testing.assert_allclose(b.values, a.values, rtol=2e-5, atol=1e-7, err_msg=metric)
    assert got["grad_missing"].values.max() == 0  # partitioned gradients are gradients
    # The structure has the tensors' own shapes (not ZeRO-3's empty placeholders), held by the optimizer.
    doc = LocalReader(str(zero_run / f"zero{stage}")).structure(".")
    params = {p["name"]: p for mod in doc["modules"] for p in mod["params"]}
    for name, p in model().named_parameters():
        assert (params[name]["shape"], params[name]["in_optimizer"]) == (list(p.shape), True), name
    found, _ = analyze(got, model=ModelInfo.from_structure(doc))
    assert not {f.kind for f in found} & {"no_gradient"}
    assert got["dead_fraction"].values[0, 0] == pytest.approx(1 / 7)  # unit 0 is dead on both ranks' batches


@pytest.mark.parametrize("stage", STAGES)
def test_zero_grad_norm_total_is_the_engines_global_norm(zero_run, unsharded, stage):
    _, norms = unsharded
    got = read(zero_run / f"zero{stage}")["grad_norm_total"]
    for rank in range(WORLD):
        engine_norm = _rank(zero_run, stage, rank)["global_norm"]
        for step in range(STEPS):
            assert close(float(got.values[step, 0]), engine_norm[str(step)], rel=2e-5), (stage, step)
            assert close(engine_norm[str(step)], norms[step], rel=2e-5)


def test_zero_gathers_no_parameter_and_sends_a_few_floats_per_tensor(zero_run):
    """Our collectives per logged step are all-reduces of per-tensor numbers: nothing is gathered. The
    ZeRO collector's: grad/weight squares and non-finite counts (SUM), grad max (MAX), and from the second
    step on the previous step's update ratio (SUM of two floats per tensor)."""
    n = len(list(model().parameters()))
    for stage in STAGES:
        for step, comm in _rank(zero_run, stage, 0)["comm"].items():
            assert all(key.endswith(".all_reduce") for key in comm), comm
            calls, sent = comm["tb_diag_logger.collectors.zero.all_reduce"]
            if step == "0":
                assert (calls, sent) == (2, 4 * (3 * n + n))
            else:
                assert (calls, sent) == (3, 4 * (3 * n + n + 2 * n))


def test_readme_deepspeed_snippet_records_the_whole_model(zero_run):
    """The README's snippet, verbatim, at ZeRO-3 on 2 ranks: logged at steps 0 and 20, and step 0's
    gradient and weight norms are the unsharded model's on both ranks' batches."""
    import torch.nn.functional as F
    from _zero_worker import labels

    s = read(zero_run / "readme" / "runs" / "zero")
    assert list(s["grad_norm"].steps) == [0, 20] and s["grad_missing"].values.max() == 0
    m = model()
    x = torch.cat([batch(r, 0) for r in range(WORLD)])
    y = torch.cat([labels(r, 0) for r in range(WORLD)])
    F.cross_entropy(m(x), y).backward()
    for j, (name, p) in enumerate(m.named_parameters()):
        assert s["grad_norm"].layers[j] == name
        assert close(float(s["grad_norm"].values[0, j]), p.grad.norm().item(), rel=2e-5), name
        assert close(float(s["weight_norm"].values[0, j]), p.norm().item(), rel=2e-6), name


HF_WORKER = os.path.join(os.path.dirname(__file__), "_hf_zero_worker.py")


@pytest.fixture(scope="module")
def hf_zero_runs(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    runs = {}
    for stage in (2, 3, "readme"):
        out = tmp_path_factory.mktemp(f"hf_zero{stage}")
        launch(HF_WORKER, [str(stage)], out)
        runs[stage] = out
    return runs


def test_readme_hf_trainer_deepspeed_snippet(hf_zero_runs):
    """The README's Trainer + DeepSpeed snippet, verbatim: world 2, ZeRO-2, logged at steps 1 and 20 in the
    Trainer's own run directory, grad_norm_total the engine's global norm."""
    out = hf_zero_runs["readme"]
    info = [json.load(open(out / f"readme-rank{r}.json")) for r in range(WORLD)]
    assert [(i["world"], i["engine"], i["stage"]) for i in info] == [(WORLD, "DeepSpeedEngine", 2)] * WORLD
    (run,) = [d for d, _, files in os.walk(out / "out" / "runs") if any("tfevents" in f for f in files)]
    s = read(run)
    assert list(s["grad_norm_total"].steps) == [1, 20] and s["grad_missing"].values.max() == 0
    for j, step in enumerate((1, 20)):
        assert close(float(s["grad_norm_total"].values[j, 0]), info[0]["norms"][str(step)], rel=2e-5)


def test_hf_trainer_with_deepspeed_records_through_the_callback(hf_zero_runs):
    """`Trainer(args=TrainingArguments(deepspeed=...))` + `DiagnosticsCallback`: world 2, a real ZeRO engine;
    the engine's global norm as grad_norm_total, the Trainer's loss, the initial weights at step 1,
    update ratios and gradients for every tensor, and ZeRO-2 and ZeRO-3 agree to float tolerance."""
    from _hf_zero_worker import STEPS, Regressor

    series = {}
    for stage in (2, 3):
        out = hf_zero_runs[stage]
        ranks = [json.load(open(out / f"rank{r}.json")) for r in range(WORLD)]
        assert [(r["world"], r["engine"], r["stage"]) for r in ranks] == [(WORLD, "DeepSpeedEngine", stage)] * WORLD
        assert ranks[0]["warnings"] == []
        s = series[stage] = read(out / "tb")
        steps = list(range(1, STEPS + 1))
        assert list(s["grad_norm_total"].steps) == steps
        for step in steps:
            assert close(float(s["grad_norm_total"].values[step - 1, 0]), ranks[0]["norms"][str(step)], rel=2e-5)
            assert close(float(s["loss"].values[step - 1, 0]), ranks[0]["losses"][str(step)], rel=1e-5)
        init = {n: p.norm().item() for n, p in Regressor().named_parameters()}
        assert s["weight_norm"].layers == list(init)
        np.testing.assert_allclose(s["weight_norm"].values[0], list(init.values()), rtol=1e-6)
        assert s["grad_missing"].values.max() == 0 and (s["grad_norm"].values > 0).all()
        assert list(s["update_ratio"].steps) == steps and (s["update_ratio"].values > 0).all()
    for metric in set(series[2]) - RANK_LOCAL:
        np.testing.assert_allclose(series[3][metric].values, series[2][metric].values, rtol=2e-5, err_msg=metric)


@pytest.fixture(scope="module")
def lightning_fsdp2(tmp_path_factory):
    pytest.importorskip("lightning")
    out = tmp_path_factory.mktemp("lightning_fsdp2")
    worker = os.path.join(os.path.dirname(__file__), "_lightning_fsdp2_worker.py")
    env = _env()
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, worker, str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_lightning_model_parallel_strategy_equals_the_unsharded_run(lightning_fsdp2):
    """`ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)` with `fully_shard` in
    `configure_model`: DTensor shards on 2 ranks, and every metric equal to one process training the same
    model on both ranks' batches (each rank recorded which samples it got)."""
    from _lightning_fsdp2_worker import BATCH, LR, data, net

    from tb_diag_logger import Diagnostics

    ranks = [json.load(open(lightning_fsdp2 / f"rank{r}.json")) for r in range(WORLD)]
    info = ranks[0]
    for r in ranks:
        assert (r["world"], r["strategy"]) == (WORLD, "ModelParallelStrategy")
        assert r["sharded"] and all(r["sharded"])
    got = read(lightning_fsdp2 / "logs", "run/version_0")

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net()

        def forward(self, x):
            return self.net(x)

    ref_model = Holder()
    opt = torch.optim.SGD(ref_model.parameters(), lr=LR)
    x, y = data().tensors
    ref_dir = lightning_fsdp2 / "reference"
    with Diagnostics(ref_model, logdir=ref_dir, every=1, optimizer=opt) as diag:
        for step in range(info["steps"]):
            rows = [i for r in ranks for i in r["batches"][step]]
            assert len(rows) == BATCH * WORLD
            loss = torch.nn.functional.mse_loss(ref_model(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss)
            opt.step()
    ref = read(ref_dir)
    # The worker's training_step calls self.net(x), never the LightningModule's own forward: the input scale
    # comes from the callback's batches, pooled over both ranks as the reference's forward saw them.
    compared = set(ref) - RANK_LOCAL - NOT_UNDER_FSDP2
    assert {"grad_norm", "weight_norm", "update_ratio", "dead_fraction", "grad_norm_total",
            *metadata.INPUT_METRICS} <= compared <= set(got)
    assert not NOT_UNDER_FSDP2 & set(got)  # absent, never a wrong value
    for metric in sorted(compared):
        a, b = ref[metric], got[metric]
        assert list(a.steps) == list(b.steps) and a.layers == b.layers, metric
        np.testing.assert_allclose(b.values, a.values, rtol=2e-5, atol=1e-7, err_msg=metric)


@pytest.fixture(scope="module")
def lightning_readme(tmp_path_factory):
    pytest.importorskip("lightning")
    out = tmp_path_factory.mktemp("lightning_readme")
    worker = os.path.join(os.path.dirname(__file__), "_lightning_fsdp2_worker.py")
    env = _env()
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, worker, str(out), "readme"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_readme_lightning_fsdp2_snippet(lightning_readme):
    """The README's Lightning + FSDP2 snippet, verbatim, on 2 ranks: DTensor shards, logged at steps 0 and 20,
    and step 0's loss, gradient and weight norms are the unsharded model's on both ranks' first batches."""
    from _lightning_fsdp2_worker import net

    ranks = [json.load(open(lightning_readme / f"readme-rank{r}.json")) for r in range(WORLD)]
    assert [(r["world"], r["strategy"], r["sharded"], r["steps"]) for r in ranks] == [
        (WORLD, "ModelParallelStrategy", True, 21)] * WORLD
    s = read(lightning_readme / "runs", "fsdp2/version_0")
    assert list(s["grad_norm"].steps) == [0, 20] and s["grad_missing"].values.max() == 0
    m = net()
    x = torch.tensor([row for r in ranks for row in r["first"]["x"]])
    y = torch.tensor([row for r in ranks for row in r["first"]["y"]])
    assert len(x) == 2 * WORLD
    loss = torch.nn.functional.mse_loss(m(x), y)
    loss.backward()
    assert close(at(s, "loss", "total", 0), loss.item(), rel=1e-5)
    # The snippet's training_step calls self.net(x): the input scale comes from the callback's batches.
    assert close(at(s, "input_mean", "", 0), x.double().mean().item(), rel=1e-5, abs_=1e-6)
    assert close(at(s, "input_std", "", 0), x.double().std(unbiased=False).item(), rel=1e-5)
    for name, p in m.named_parameters():
        assert close(at(s, "grad_norm", f"net.{name}", 0), p.grad.norm().item(), rel=2e-5), name
        assert close(at(s, "weight_norm", f"net.{name}", 0), p.norm().item(), rel=2e-6), name


def test_hf_trainer_fsdp_on_cpu_falls_back_to_ddp_and_records_it(tmp_path):
    """`TrainingArguments(fsdp="full_shard")` + `DiagnosticsCallback` on 2 gloo processes, as far as CPU allows:
    the Trainer builds an FSDP plugin, accelerate drops it and wraps the model in DistributedDataParallel (world
    2). What the callback records is right for that path: one event file, process zero's, with the Trainer's
    scalars; the loss and the pre-clip norm the Trainer logged; and our own norm of the gradients (clipping
    leaves them as they are) equal to the Trainer's, so they are the all-reduced ones, not one rank's."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from _hf_fsdp_worker import STEPS

    launch(os.path.join(os.path.dirname(__file__), "_hf_fsdp_worker.py"), [], tmp_path)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(WORLD)]
    for r in ranks:
        assert (r["world"], r["wrapped"], r["fsdp_asked"], r["fsdp_enabled"]) == (
            WORLD, "DistributedDataParallel", True, False), r
        assert r["distributed_type"].endswith("MULTI_CPU") and r["warnings"] == []
    runs = [d for d, _, files in os.walk(tmp_path / "tb") for f in files if "tfevents" in f]
    assert len(runs) == 1, runs
    s = read(runs[0])
    logs = ranks[0]["logs"]
    assert sorted(map(int, logs)) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        trainer_log = logs[str(step)]
        assert close(at(s, "loss", "total", step), trainer_log["loss"], rel=1e-6), step
        assert close(at(s, "grad_norm_preclip", "", step), trainer_log["grad_norm"], rel=1e-6), step
        assert close(at(s, "grad_norm_total", "", step), trainer_log["grad_norm"], rel=2e-5), step
