"""One rank of the DeepSpeed ZeRO tests (gloo, CPU, DS_ACCELERATOR=cpu).

    python _zero_worker.py STAGES RANK WORLD PORT OUTDIR

STAGES is a comma-separated list of ZeRO stages (``1,2,3``) and ``readme``
(the README's snippet, see `run_readme`), trained one after the other in
one process group. Each stage logs to OUTDIR/zero<S>
through ``Diagnostics(engine, logdir=..., every=1)``, the README's snippet.
Each rank writes OUTDIR/zero<S>-rank<R>.json: the engine's own global
gradient norms, the wrapper types and world size, and the collectives our
logger issued (counted by the calling module's name, so DeepSpeed's own are
not counted). The model and batches are defined here so that the test can
train the same model unsharded on the same data.
"""

from __future__ import annotations

import json
import os
import re
import sys

import torch
from torch import nn

STEPS = 4
LR = 0.1


def model() -> nn.Module:
    """7 and 3 rows: partitions that split tensors unevenly over 2 ranks; unit 0 of the ReLU starts dead."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    with torch.no_grad():
        m[0].bias[0] = -50.0
    return m


def batch(rank: int, step: int) -> torch.Tensor:
    """Each rank's own batch (the same size on every rank: the engine averages the ranks' gradients)."""
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(1000 + 100 * step + rank))


def config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }


class CollectiveCounter:
    """Counts the collectives (calls and bytes sent) that tb_diag_logger's own code issues."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor", "gather")

    def __init__(self) -> None:
        self.calls: dict[str, tuple[int, int]] = {}
        self._orig = {n: getattr(torch.distributed, n) for n in self.NAMES}
        for name, fn in self._orig.items():
            setattr(torch.distributed, name, self._counting(name, fn))

    def _counting(self, name, fn):
        def call(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("tb_diag_logger"):
                key = f"{caller}.{name}"
                tensor = next(a for a in (*args, *kwargs.values()) if torch.is_tensor(a) or isinstance(a, list))
                sent = tensor if torch.is_tensor(tensor) else next(t for t in args if torch.is_tensor(t))
                calls, sent_bytes = self.calls.get(key, (0, 0))
                self.calls[key] = (calls + 1, sent_bytes + sent.numel() * sent.element_size())
            return fn(*args, **kwargs)

        return call

    def take(self) -> dict[str, tuple[int, int]]:
        """{"<module>.<collective>": (calls, bytes each rank sent)} since the last call."""
        out, self.calls = self.calls, {}
        return out


def run_stage(stage: int, rank: int, outdir: str, counter: CollectiveCounter) -> None:
    import deepspeed

    from tb_diag_logger import Diagnostics

    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    engine, ds_opt, _, _ = deepspeed.initialize(model=m, optimizer=opt, config=config(stage))
    diag = Diagnostics(engine, logdir=os.path.join(outdir, f"zero{stage}"), every=1)
    counter.take()
    out: dict = {
        "world": torch.distributed.get_world_size(),
        "engine": type(engine).__name__,
        "optimizer": type(ds_opt).__name__,
        "stage": engine.zero_optimization_stage(),
        "global_norm": {},
        "comm": {},
        "grad_none": {},
        "param_numel_at_step": {},
    }
    for step in range(STEPS):
        loss = engine(batch(rank, step)).pow(2).mean()
        engine.backward(loss)
        out["grad_none"][step] = all(p.grad is None for p in engine.module.parameters())
        out["param_numel_at_step"][step] = sum(p.numel() for p in engine.module.parameters())
        diag.step(step, loss=loss)
        engine.step()
        out["global_norm"][step] = float(engine.get_global_grad_norm())
        out["comm"][step] = counter.take()  # diag.step()'s collectives and the update-ratio hook's
    diag.close()
    with open(os.path.join(outdir, f"zero{stage}-rank{rank}.json"), "w") as f:
        json.dump(out, f)


def readme_snippet(marker: str) -> str:
    """The ```python block after `<!-- readme-test: marker -->` in README.md, as written."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    return re.search(rf"<!-- readme-test: {re.escape(marker)} -->\s*```python\n(.*?)```", text, re.S).group(1)


def labels(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(2000 + 100 * step + rank))


def run_readme(rank: int, outdir: str) -> None:
    """README's DeepSpeed snippet, verbatim, at ZeRO-3: 21 steps, logged at 0 and 20, in OUTDIR/readme."""
    here = os.path.join(outdir, "readme")
    os.makedirs(here, exist_ok=True)
    os.chdir(here)
    m = model()
    loader = [(batch(rank, step), labels(rank, step)) for step in range(21)]
    exec(readme_snippet("deepspeed"), {"model": m, "opt": torch.optim.SGD(m.parameters(), lr=LR),
                                        "ds_config": config(3), "loader": loader})


def main() -> None:
    stages, rank, world, port, outdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    counter = CollectiveCounter()
    for stage in stages.split(","):
        if stage == "readme":
            run_readme(rank, outdir)
        else:
            run_stage(int(stage), rank, outdir, counter)
    torch.distributed.destroy_process_group()
    # Everything is written: leave without the interpreter's teardown, where DeepSpeed's and gloo's C++
    # threads once aborted a finished rank ("terminate called without an active exception", exit -6).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
