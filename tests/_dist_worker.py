"""One rank of the torch.distributed tests (gloo, CPU).

    python _dist_worker.py SCENARIO RANK WORLD PORT OUTDIR

SCENARIO is a comma-separated list of ``ddp`` (DistributedDataParallel),
``fsdp`` (FSDP2 ``fully_shard`` on a CPU device mesh) and ``early``
(``Diagnostics`` created before ``init_process_group``), run one after the
other in one process group (starting processes is the slow part). Both
ranks log to OUTDIR/<scenario> with ``Diagnostics(..., logdir=...)``; only
rank 0 may write. Each rank writes OUTDIR/<scenario>-rank<R>.json with what
it saw (warnings, local values). The models
and batches are defined here so that the test can compute the
single-process reference with the same numbers.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import warnings

import torch
from torch import nn

STEPS = 4


def ddp_model() -> nn.Module:
    """Unit 0 of the ReLU is positive only for inputs with x[:, 0] > 0, unit 1 never, unit 2 often."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 1.0, 0.5, 0]]))
        model[0].bias.copy_(torch.tensor([0.0, -1.0, 0.1]))
    return model


def ddp_batch(rank: int, step: int) -> torch.Tensor:
    """Rank 0: x[:, 0] < 0 (unit 0 dead on its batch); rank 1: x[:, 0] > 0. Batch sizes differ."""
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(4 + 2 * rank, 4, generator=g)
    x[:, 0] = x[:, 0].abs() + 0.5
    if rank == 0:
        x[:, 0] = -x[:, 0]
    return x


def fsdp_model() -> nn.Module:
    """7 and 3 rows: uneven shards over 2 ranks."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def fsdp_batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(1000 + 100 * step + rank))


def _ddp(rank: int, logdir: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from tb_diag_logger import Diagnostics

    model = ddp_model()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    diag = Diagnostics(ddp, logdir=logdir, every=2, optimizer=opt)
    local = {}
    for step in range(STEPS + 1):
        x = ddp_batch(rank, step)
        per_sample = ddp(x).pow(2).mean(1)
        loss = per_sample.mean()
        opt.zero_grad()
        loss.backward()
        if step < STEPS:
            diag.step(step, loss=loss, losses={"ps": per_sample, "half": loss * 0.5})
        else:  # the ranks disagree on the loss names: a warning, rank-local values, no hang
            diag.step(step, losses={"rank0" if rank == 0 else "rank1": loss})
        local[step] = {"loss": loss.item()}
        opt.step()
    diag.close()
    return {"local": local, "writes": diag._sink is not None}


def _fsdp(rank: int, world: int, logdir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tb_diag_logger import Diagnostics

    model = fsdp_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = Diagnostics(model, logdir=logdir, every=1, optimizer=opt)
    shards = {}
    for step in range(STEPS):
        loss = model(fsdp_batch(rank, step)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if step == STEPS - 1 and rank == 1:  # one NaN in one rank's shard
            model[0].weight.grad.to_local()[0, 0] = float("nan")
        shards[step] = {
            n: [type(p).__name__, list(p.to_local().shape), list(p.shape)] for n, p in model.named_parameters()
        }
        diag.step(step, loss=loss)
        opt.step()
    diag.close()
    return {"shards": shards, "writes": diag._sink is not None}


def _early_setup(logdir: str):
    """`Diagnostics` created before `init_process_group`: whether this rank writes is decided later."""
    from tb_diag_logger import Diagnostics

    model = ddp_model()
    return model, Diagnostics(model, logdir=logdir, every=1)


def _early(rank: int, model: nn.Module, diag) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    for step in range(2):
        loss = ddp(ddp_batch(rank, step)).pow(2).mean()
        ddp.zero_grad()
        loss.backward()
        diag.step(step, loss=loss)
    diag.close()
    return {"writes": diag._sink is not None}


def main() -> None:
    scenario, rank, world, port, outdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    import torch.distributed as dist

    names = scenario.split(",")
    early = _early_setup(os.path.join(outdir, "early")) if "early" in names else None
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),  # a hung collective fails the test instead of blocking CI
    )
    for name in names:
        logdir = os.path.join(outdir, name)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            if name == "ddp":
                result = _ddp(rank, logdir)
            elif name == "fsdp":
                result = _fsdp(rank, world, logdir)
            else:
                result = _early(rank, *early)
        result["warnings"] = [f"{w.category.__name__}: {w.message}" for w in record if "tb-diag" in str(w.message)]
        dist.barrier()
        with open(os.path.join(outdir, f"{name}-rank{rank}.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
