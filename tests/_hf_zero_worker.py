"""One rank of the HF Trainer + DeepSpeed ZeRO test (gloo, CPU), with `DiagnosticsCallback`.

    python _hf_zero_worker.py STAGE RANK WORLD PORT OUTDIR

STAGE is a ZeRO stage, or ``readme`` for the README's snippet (see `run_readme`).

The README's recipe: ACCELERATE_USE_DEEPSPEED=true, ``PartialState(backend="gloo")`` and
``accelerator_config={"use_configured_state": True}`` before `TrainingArguments` (without them
both processes run as rank 0 of a world of one). Logs to OUTDIR/tb; writes OUTDIR/rank<R>.json with
the world size, the engine, and the engine's own global gradient norm and the Trainer's logged loss
at every optimizer step.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
from torch import nn

STEPS = 3


class Regressor(nn.Module):
    """A tiny model the Trainer can train: forward(x, labels) -> {"loss", "logits"}."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(-1)
        return {"loss": (out - labels).pow(2).mean(), "logits": out}


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }


def dataset(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"x": x, "labels": y} for x, y in zip(torch.randn(n, 4, generator=g), torch.randn(n, generator=g))]


def main() -> None:
    stage, rank, world, port, outdir = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    if stage == "readme":
        return run_readme(outdir)
    os.environ.update(ACCELERATE_USE_DEEPSPEED="true", TENSORBOARD_LOGGING_DIR=os.path.join(outdir, "tb"))
    from accelerate import PartialState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from tb_diag_logger import DiagnosticsWarning
    from tb_diag_logger.integrations.transformers import DiagnosticsCallback

    PartialState(backend="gloo")
    args = TrainingArguments(
        output_dir=os.path.join(outdir, "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        logging_steps=1, max_steps=STEPS, report_to=["tensorboard"], save_strategy="no", use_cpu=True,
        disable_tqdm=True, learning_rate=0.05, deepspeed=ds_config(int(stage)),
        accelerator_config={"use_configured_state": True},
    )
    data = dataset(64)

    class Record(TrainerCallback):
        """The engine's global gradient norm after each optimizer step, and the logged losses."""

        def __init__(self) -> None:
            self.norms: dict[int, float] = {}
            self.losses: dict[int, float] = {}

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.norms[state.global_step + 1] = float(trainer.deepspeed.get_global_grad_norm())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                self.losses[state.global_step] = logs["loss"]

    record = Record()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(model=Regressor(), args=args, train_dataset=data,
                          callbacks=[DiagnosticsCallback(every=1), record])
        trainer.train()
    result = {
        "world": trainer.args.world_size,
        "engine": type(trainer.model_wrapped).__name__,
        "stage": trainer.deepspeed.zero_optimization_stage(),
        "norms": record.norms,
        "losses": record.losses,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, DiagnosticsWarning)],
    }
    with open(os.path.join(outdir, f"rank{trainer.args.process_index}.json"), "w") as f:
        json.dump(result, f)


def run_readme(outdir: str) -> None:
    """README's Trainer + DeepSpeed snippet, verbatim (ZeRO-2), run from OUTDIR: 112 samples at the default
    batch of 8 on 2 ranks for 3 epochs are 21 optimizer steps, logged at 1 and 20. Before its last line
    (`trainer.train()`) a callback is added that writes OUTDIR/readme-rank<R>.json (world, engine, norms)."""
    from transformers import TrainerCallback

    sys.path.insert(0, os.path.dirname(__file__))
    from _zero_worker import readme_snippet

    os.chdir(outdir)
    *setup, last = readme_snippet("hf-deepspeed").strip().splitlines()
    assert last == "trainer.train()"
    scope = {"model": Regressor(), "train_ds": dataset(112), "ds_config": ds_config(2)}
    exec("\n".join(setup), scope)
    trainer = scope["trainer"]
    norms: dict[int, float] = {}

    class Norms(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            norms[state.global_step + 1] = float(trainer.deepspeed.get_global_grad_norm())

    trainer.add_callback(Norms())
    exec(last, scope)
    with open(os.path.join(outdir, f"readme-rank{trainer.args.process_index}.json"), "w") as f:
        json.dump({"world": trainer.args.world_size, "engine": type(trainer.model_wrapped).__name__,
                   "stage": trainer.deepspeed.zero_optimization_stage(), "norms": norms}, f)


if __name__ == "__main__":
    main()
    # Everything is written: leave without the interpreter's teardown, where DeepSpeed's and gloo's C++
    # threads once aborted a finished rank ("terminate called without an active exception", exit -6).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
