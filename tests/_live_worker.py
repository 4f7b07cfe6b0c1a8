"""One rank of the live-findings distributed test (gloo, CPU): a DDP run whose learning rate ramps to NaN.

    python _live_worker.py RANK WORLD PORT OUTDIR STOP_ON

Both ranks train with `Diagnostics(..., stop_on=STOP_ON or None, every=5)`; only rank 0 writes
(OUTDIR/run). Each rank writes OUTDIR/rank<R>.json: the last step it ran and whether it stopped.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from tb_diag_logger import Diagnostics

STEPS = 120


def main(rank: int, world: int, port: int, outdir: str, stop_on: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)
    diag = Diagnostics(model, logdir=os.path.join(outdir, "run"), every=5, optimizer=opt, stop_on=stop_on or None)
    last = -1
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 1.15**step
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        diag.step(step, loss=loss)
        opt.step()
        last = step
        if diag.should_stop:
            break
    diag.close()
    torch.distributed.barrier()  # a rank left behind in a collective would hang here, and the test would fail
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump({"last": last, "stopped": diag.should_stop}, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else "")
