"""A Lightning DDP training (CPU, gloo, 2 processes) with `DiagnosticsCallback`, for tests/test_lightning.py.

    python _lightning_ddp_worker.py OUTDIR

Lightning's `strategy="ddp"` starts the second process by running this
script again. Each rank writes OUTDIR/rank<R>.pt: per training_step, the
global step, the weights before it, its batch and its loss.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main(outdir: str) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from tb_diag_logger.integrations.lightning import DiagnosticsCallback

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.act, self.fc2 = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1)
            self.seen: list = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            weights = {n: p.detach().clone() for n, p in self.named_parameters()}
            loss = F.mse_loss(self.fc2(self.act(self.fc1(x))), y)
            self.seen.append((self.trainer.global_step, weights, x.clone(), loss.item()))
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
    model = Net()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, log_every_n_steps=1,
        logger=TensorBoardLogger(os.path.join(outdir, "logs"), name="run", version=0),
        callbacks=[DiagnosticsCallback(every=1)], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Lightning's DistributedSampler (no shuffle) hands rank r the samples r, r+2, ...
    trainer.fit(model, DataLoader(data, batch_size=2, shuffle=False))
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"seen": model.seen, "final": final}, os.path.join(outdir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
