"""One rank of the HF `Trainer(fsdp="full_shard")` test on CPU (gloo), with `DiagnosticsCallback`.

    python _hf_fsdp_worker.py RANK WORLD PORT OUTDIR

On CPU accelerate drops the FSDP plugin the Trainer builds and runs DDP; this records what actually ran.
Trains a tiny GPT-2 for 3 optimizer steps, the Trainer's TensorBoard logging in OUTDIR/tb, and writes
OUTDIR/rank<R>.json: the world size, the wrapper type, whether an FSDP plugin was asked for and whether
accelerate kept it, the Trainer's logged loss and grad_norm per step, and the DiagnosticsWarnings seen.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import torch

STEPS = 3


def main() -> None:
    rank, world, port, outdir = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world,
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, TENSORBOARD_LOGGING_DIR=os.path.join(outdir, "tb"))
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from tb_diag_logger import DiagnosticsWarning
    from tb_diag_logger.integrations.transformers import DiagnosticsCallback

    class Logs(TrainerCallback):
        def __init__(self) -> None:
            self.logs: dict[int, dict] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                self.logs[state.global_step] = dict(logs)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 96, (32, 8), generator=g)]
    # max_grad_norm far above the norm: clipping leaves the gradients as they are, so the norm we measure
    # after it is the Trainer's pre-clip norm.
    args = TrainingArguments(
        output_dir=os.path.join(outdir, "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        logging_steps=1, max_steps=STEPS, report_to=["tensorboard"], save_strategy="no", use_cpu=True,
        disable_tqdm=True, learning_rate=1e-3, ddp_backend="gloo", max_grad_norm=1e6, fsdp="full_shard",
    )
    logs = Logs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[DiagnosticsCallback(every=1), logs])
        trainer.train()
    result = {
        "world": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "fsdp_asked": trainer.args.fsdp_plugin_args is not None,
        "fsdp_enabled": trainer.is_fsdp_enabled,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "logs": logs.logs,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, DiagnosticsWarning)],
    }
    with open(os.path.join(outdir, f"rank{trainer.args.process_index}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
    # Everything is written: leave without the interpreter's teardown, where gloo's C++ threads once
    # aborted a finished rank ("terminate called without an active exception", exit -6), as in the ZeRO workers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
