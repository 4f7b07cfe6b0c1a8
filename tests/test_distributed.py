"""torch.distributed on real processes: 2 ranks, gloo, CPU; checked against a single-process reference."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from _dist_worker import STEPS, ddp_batch, ddp_model, fsdp_batch, fsdp_model
from _logger_helpers import at, close, read, unit_dead_fraction

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")
WORLD = 2

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenarios: str, outdir) -> dict[str, list[dict]]:
    """Run WORLD ranks through `scenarios`; a hang is killed after a timeout, never blocking the suite."""
    for attempt in range(2):
        try:
            return _launch_once(scenarios, outdir)
        except _PortTaken:
            if attempt:
                raise
    raise AssertionError("unreachable")


class _PortTaken(Exception):
    """Another process took the free port between our check and the rendezvous."""


def _launch_once(scenarios: str, outdir) -> dict[str, list[dict]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, scenarios, str(rank), str(WORLD), str(port), str(outdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(WORLD)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=180))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    if any(p.returncode and "address already in use" in err.lower() for p, (_, err) in zip(procs, outputs)):
        raise _PortTaken()
    for rank, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} of {scenarios} failed (exit {p.returncode}):\n{err[-4000:]}"
    results: dict[str, list[dict]] = {}
    for name in scenarios.split(","):
        for rank in range(WORLD):
            with open(os.path.join(outdir, f"{name}-rank{rank}.json")) as f:
                results.setdefault(name, []).append(json.load(f))
    return results


def _norms(model) -> dict[str, dict[str, float]]:
    out = {"grad_norm": {}, "grad_max_abs": {}, "weight_norm": {}}
    for n, p in model.named_parameters():
        out["grad_norm"][n] = p.grad.norm().item()
        out["grad_max_abs"][n] = p.grad.abs().max().item()
        out["weight_norm"][n] = p.detach().norm().item()
    out["grad_norm_total"] = {"": torch.stack([p.grad.norm() for p in model.parameters()]).norm().item()}
    return out


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    """One launch of two ranks for both scenarios."""
    outdir = tmp_path_factory.mktemp("dist")
    return outdir, _launch("ddp,fsdp,early", outdir)


@pytest.fixture(scope="module")
def ddp_run(dist_run):
    outdir, results = dist_run
    return outdir, results["ddp"]


@pytest.fixture(scope="module")
def fsdp_run(dist_run):
    outdir, results = dist_run
    return outdir, results["fsdp"]


def _ddp_reference():
    """One process, both ranks' batches: DDP's gradient is the average of the ranks' gradients."""
    model = ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = {}
    for step in range(STEPS):
        xs = [ddp_batch(r, step) for r in range(WORLD)]
        per_sample = [model(x).pow(2).mean(1) for x in xs]
        loss = sum(p.mean() for p in per_sample) / WORLD
        opt.zero_grad()
        loss.backward()
        if step % 2 == 0:
            acts = torch.relu(model[0](torch.cat(xs))).detach().numpy()
            everything = torch.cat(per_sample).detach().numpy().astype(np.float64)
            r = _norms(model)
            r["loss"] = {"total": loss.item(), "half": 0.5 * loss.item(), "ps": everything.mean()}
            r["loss_p25"] = {"ps": np.quantile(everything, 0.25)}
            r["loss_max"] = {"ps": everything.max()}
            r["dead_fraction"] = {"1": unit_dead_fraction(acts)}
            r["act_mean"] = {"1": acts.mean()}
            r["act_std"] = {"1": acts.std(ddof=1)}
            r["update_ratio"] = {
                n: 0.1 * p.grad.norm().item() / p.detach().norm().item() for n, p in model.named_parameters()
            }
            ref[step] = r
        opt.step()
    return ref


def test_ddp_writes_one_event_stream_from_rank_0(ddp_run):
    outdir, results = ddp_run
    assert [r["writes"] for r in results] == [True, False]
    assert len(glob.glob(os.path.join(outdir, "ddp", "events.out.tfevents.*"))) == 1


def test_ddp_values_are_those_of_the_whole_job(ddp_run):
    outdir, _ = ddp_run
    s = read(os.path.join(outdir, "ddp"))
    ref = _ddp_reference()
    assert s["grad_norm"].steps.tolist() == [0, 2, 4]
    # Unit 0 is dead on rank 0's batch but alive on rank 1's: only unit 1 is dead for the job.
    assert at(s, "dead_fraction", "1", 0) == pytest.approx(1 / 3)
    for step, metrics in ref.items():
        for metric, layers in metrics.items():
            for layer, want in layers.items():
                got = at(s, metric, layer, step)
                assert close(got, float(want), rel=1e-4, abs_=1e-6), (metric, layer, step, got, want)


def test_ddp_ranks_that_disagree_warn_and_do_not_hang(ddp_run):
    outdir, results = ddp_run
    for r in results:
        disagree = [w for w in r["warnings"] if "ranks disagree" in w]
        assert len(disagree) == 1, r["warnings"]
    s = read(os.path.join(outdir, "ddp"))
    # Rank 0 recorded its own value under its own name at the step where the ranks disagreed.
    assert close(at(s, "loss", "rank0", 4), results[0]["local"]["4"]["loss"])
    assert "rank1" not in s["loss"].layers


def test_fsdp2_shards_are_dtensors_of_uneven_size(fsdp_run):
    _, results = fsdp_run
    shards = [r["shards"]["0"] for r in results]
    assert shards[0]["0.weight"] == ["DTensor", [4, 5], [7, 5]]
    assert shards[1]["0.weight"] == ["DTensor", [3, 5], [7, 5]]
    assert shards[1]["2.bias"] == ["DTensor", [1], [3]]
    assert [r["writes"] for r in results] == [True, False]


def test_fsdp2_norms_from_shards_equal_full_model_norms(fsdp_run):
    outdir, results = fsdp_run
    s = read(os.path.join(outdir, "fsdp"))
    model = fsdp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        xs = [fsdp_batch(r, step) for r in range(WORLD)]
        loss = sum(model(x).pow(2).mean() for x in xs) / WORLD
        opt.zero_grad()
        loss.backward()
        if step == STEPS - 1:
            model[0].weight.grad[4, 0] = float("nan")  # rank 1's shard holds rows 4..6
        want = _norms(model)
        want["loss"] = {"total": loss.item()}
        want["dead_fraction"] = {"1": unit_dead_fraction(torch.relu(model[0](torch.cat(xs))).detach().numpy())}
        want["update_ratio"] = {
            n: 0.1 * p.grad.norm().item() / p.detach().norm().item() for n, p in model.named_parameters()
        }
        for metric, layers in want.items():
            for layer, value in layers.items():
                got = at(s, metric, layer, step)
                assert close(got, value, rel=1e-4, abs_=1e-6), (metric, layer, step, got, value)
        opt.step()
    last = STEPS - 1
    assert at(s, "grad_nonfinite", "0.weight", last) == 1
    assert all(at(s, "grad_nonfinite", n, last) == 0 for n in ("0.bias", "2.weight", "2.bias"))
    assert not any("failed" in w for r in results for w in r["warnings"]), results


def test_diagnostics_created_before_init_process_group_still_write_once(dist_run):
    outdir, results = dist_run
    assert [r["writes"] for r in results["early"]] == [True, False]
    assert len(glob.glob(os.path.join(outdir, "early", "events.out.tfevents.*"))) == 1
    s = read(os.path.join(outdir, "early"))
    assert s["grad_norm"].steps.tolist() == [0, 1]
    assert at(s, "dead_fraction", "1", 0) == pytest.approx(1 / 3)  # reduced over both ranks
