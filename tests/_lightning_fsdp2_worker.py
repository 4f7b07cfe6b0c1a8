"""Lightning `ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)` (FSDP2 `fully_shard` in
`configure_model`) on CPU with `DiagnosticsCallback`, for tests/test_sharded.py.

    python _lightning_fsdp2_worker.py OUTDIR [readme]

Lightning starts the second process by running this script again. Each rank writes OUTDIR/rank<R>.json: the
world size, the strategy, whether the parameters were DTensor shards during training, and its batches.
With ``readme``, the README's snippet runs instead (see `run_readme`).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LR = 0.1
BATCH = 2  # per rank


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g))


def net() -> nn.Sequential:
    """7 and 3 rows: uneven shards over 2 ranks."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def main(outdir: str) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    from tb_diag_logger.integrations.lightning import DiagnosticsCallback

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net()
            self.sharded: list[bool] = []
            self.batches: list[list[int]] = []  # the sample indices of each step's batch on this rank

        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            self.sharded.append(all(callable(getattr(p, "to_local", None)) for p in self.parameters()))
            self.batches.append(idx.tolist())
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    model = Net()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, log_every_n_steps=1,
        logger=TensorBoardLogger(os.path.join(outdir, "logs"), name="run", version=0),
        callbacks=[DiagnosticsCallback(every=1)], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    # The strategy's DistributedSampler shuffles: each rank records which samples it trained on.
    x, y = data().tensors
    trainer.fit(model, DataLoader(TensorDataset(x, y, torch.arange(len(x))), batch_size=BATCH, shuffle=False))
    with open(os.path.join(outdir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"world": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                   "sharded": model.sharded, "steps": trainer.global_step, "batches": model.batches}, f)


def run_readme(outdir: str) -> None:
    """README's Lightning + FSDP2 snippet, verbatim, run from OUTDIR: 84 samples in batches of 2 on 2 ranks are
    21 optimizer steps, logged at 0 and 20. Before its last line (`trainer.fit(model, loader)`) a callback is
    added that keeps this rank's first batch; OUTDIR/readme-rank<R>.json gets it, the world size, the strategy
    and whether the parameters were DTensor shards after training."""
    from lightning.pytorch import Callback

    sys.path.insert(0, os.path.dirname(__file__))
    from _zero_worker import readme_snippet

    os.chdir(outdir)
    *setup, last = readme_snippet("lightning-fsdp2").strip().splitlines()
    assert last == "trainer.fit(model, loader)"
    g = torch.Generator().manual_seed(2)
    loader = DataLoader(TensorDataset(torch.randn(84, 5, generator=g), torch.randn(84, 3, generator=g)), batch_size=2)
    scope = {"net": net(), "loader": loader}
    exec("\n".join(setup), scope)
    trainer, model = scope["trainer"], scope["model"]
    first: dict[str, list] = {}

    class FirstBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                first.update(x=batch[0].tolist(), y=batch[1].tolist())

    trainer.callbacks.append(FirstBatch())
    exec(last, scope)
    with open(os.path.join(outdir, f"readme-rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"world": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                   "sharded": all(callable(getattr(p, "to_local", None)) for p in model.parameters()),
                   "steps": trainer.global_step, "first": first}, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[2:] == ["readme"]:
        run_readme(sys.argv[1])
    else:
        main(sys.argv[1])
