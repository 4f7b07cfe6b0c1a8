"""One rank of the live-findings distributed test (gloo, CPU): `diverging_loop` under DDP (NaN from step 55).

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
from _live_loop import diverging_loop
from torch import nn

STEPS = 120


def main(rank: int, world: int, port: int, outdir: str, stop_on: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    diag, last = diverging_loop(os.path.join(outdir, "run"), STEPS, wrap=nn.parallel.DistributedDataParallel,
                                stop_on=stop_on or None)
    diag.close()
    torch.distributed.barrier()  # a rank left behind in a collective would hang here, and the test would fail
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump({"last": last, "stopped": diag.should_stop}, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else "")
