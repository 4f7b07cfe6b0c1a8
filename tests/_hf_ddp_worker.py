"""One process of the Trainer-under-DDP test (gloo, CPU), started with torchrun's environment variables.

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _hf_ddp_worker.py OUTDIR

Trains a tiny GPT-2 with `DiagnosticsCallback(every=1)`, the Trainer's TensorBoard logging in OUTDIR/tb,
and writes what the Trainer logged (and the DiagnosticsWarnings seen) to OUTDIR/rank<R>.json.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from tb_diag_logger import DiagnosticsWarning
from tb_diag_logger.integrations.transformers import DiagnosticsCallback


class _Logs(TrainerCallback):
    def __init__(self) -> None:
        self.logs: dict[int, dict] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.logs[state.global_step] = dict(logs)


def main(outdir: str) -> None:
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(outdir, "tb")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 96, (32, 8), generator=g)]
    args = TrainingArguments(
        output_dir=os.path.join(outdir, "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        logging_steps=1, max_steps=3, report_to=["tensorboard"], save_strategy="no", use_cpu=True,
        disable_tqdm=True, learning_rate=1e-3, ddp_backend="gloo",
    )
    logs = _Logs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[DiagnosticsCallback(every=1), logs])
        trainer.train()
    rank = trainer.args.process_index
    result = {
        "world": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "logs": logs.logs,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, DiagnosticsWarning)],
    }
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
    # Everything is written: leave without the interpreter's teardown, where gloo's C++ threads once
    # aborted a finished rank ("terminate called without an active exception", exit -6), as in the ZeRO workers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
