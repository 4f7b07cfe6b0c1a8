"""`DiagnosticsCallback` in a real transformers `Trainer` (tiny GPT-2 from a config, CPU, no hub)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from _logger_helpers import at, close, read

transformers = pytest.importorskip("transformers")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.integrations import TensorBoardCallback  # noqa: E402

from tb_diag_logger import Diagnostics, DiagnosticsWarning  # noqa: E402
from tb_diag_logger.integrations.transformers import DiagnosticsCallback  # noqa: E402


class _Witness(TrainerCallback):
    """What the Trainer itself logged and scheduled, recorded outside the callback under test."""

    def __init__(self) -> None:
        self.logs: dict[int, dict] = {}
        self.lrs: dict[int, list[float]] = {}
        self.evals: dict[int, dict] = {}

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        # The scheduler steps after the optimizer: what it says now is this step's learning rate.
        self.lrs[state.global_step + 1] = list(lr_scheduler.get_last_lr())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.logs[state.global_step] = dict(logs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evals[state.global_step] = dict(metrics)


def _train(tmp_path, lr=5e-4, steps=6, every=2, report_to=("tensorboard",), max_grad_norm=0.5, tb_last=False,
           evaluate=False, **cb):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    data = [{"input_ids": torch.randint(0, 96, (16,)), "labels": torch.randint(0, 96, (16,))} for _ in range(48)]
    more = {"eval_strategy": "steps", "eval_steps": 2, "per_device_eval_batch_size": 8} if evaluate else {}
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        logging_steps=1, max_steps=steps, report_to=list(report_to), save_strategy="no", use_cpu=True,
        disable_tqdm=True, learning_rate=lr, max_grad_norm=max_grad_norm, **more,
    )
    witness = _Witness()
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8] if evaluate else None,
                      callbacks=[DiagnosticsCallback(every=every, **cb), witness])
    if tb_last:  # the Trainer's TensorBoardCallback after ours: its on_train_begin runs second
        trainer.remove_callback(TensorBoardCallback)
        trainer.add_callback(TensorBoardCallback)
    trainer.train()
    return trainer, witness


def _only_run(root) -> str:
    runs = [os.path.join(d, r) for d, _, files in os.walk(root) for r in files if "tfevents" in r]
    assert len(runs) == 1, runs  # one event file: the Trainer's and ours together
    return os.path.dirname(runs[0])


def test_trainer_scalars_and_diagnostics_are_one_run_with_the_trainers_loss_norm_and_lr(tmp_path):
    trainer, witness = _train(tmp_path)
    run = _only_run(tmp_path / "out" / "runs")
    series = read(run)
    events = EventAccumulator(run, size_guidance={"scalars": 0})
    events.Reload()
    trainer_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(witness.logs) == [1, 2, 3, 4, 5, 6]
    assert series["loss"].steps.tolist() == [1, 2, 4, 6]  # the first step, then every 2nd
    for step in (1, 2, 4, 6):
        logged = witness.logs[step]
        # The whole optimizer step over both micro-batches, as the Trainer summed and logged it.
        assert close(at(series, "loss", "total", step), logged["loss"], rel=1e-6)
        assert close(at(series, "loss", "total", step), trainer_loss[step], rel=1e-6)
        assert close(at(series, "grad_norm_preclip", "", step), logged["grad_norm"], rel=1e-6)
        assert logged["grad_norm"] > 0.5  # clipping to 0.5 changed the step: the total is post-clip
        assert close(at(series, "grad_norm_total", "", step), 0.5, rel=1e-4)
        lrs = witness.lrs[step]
        names = series["learning_rate"].layers
        assert len(names) == len(lrs)
        for name, lr in zip(names, lrs):
            assert close(at(series, "learning_rate", name, step), lr, rel=1e-6)
        assert close(logged["learning_rate"], lrs[0], rel=1e-6)
    ratios = series["update_ratio"]
    assert ratios.steps.tolist() == [1, 2, 4, 6]
    assert set(ratios.layers) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    # From step 2 on: at step 1 the zero-initialised biases have ‖w‖ = 0, a ratio recorded as NaN.
    assert (ratios.values[1:][ratios.present[1:]] > 0).all()
    assert "act_std" in series  # the training forwards were captured
    for name in ("training_step", "_get_grad_norm"):
        assert name not in vars(trainer)  # the Trainer got its own methods back


def test_a_diverging_run_records_the_divergence(tmp_path):
    _, witness = _train(tmp_path, lr=30.0, steps=8)
    series = read(_only_run(tmp_path / "out" / "runs"))
    steps = [1, 2, 4, 6, 8]
    losses = [at(series, "loss", "total", s) for s in steps]
    assert losses == pytest.approx([witness.logs[s]["loss"] for s in steps], rel=1e-6)
    first = losses[0]  # the initial weights' loss, near ln(96): the level the divergence is seen against
    assert first < 6
    assert min(losses[1:]) > 100 * first
    assert at(series, "grad_norm_preclip", "", 8) > 10 * at(series, "grad_norm_total", "", 8)


def test_without_the_tensorboard_callback_it_writes_where_the_trainer_would(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    _, witness = _train(tmp_path, steps=2, every=1, report_to=())
    series = read(_only_run(tmp_path / "tb"))
    assert series["loss"].steps.tolist() == [1, 2]
    assert close(at(series, "loss", "total", 2), witness.logs[2]["loss"], rel=1e-6)
    assert not (tmp_path / "out" / "runs").exists()


def test_the_tensorboard_logging_dir_is_shared_with_the_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    _train(tmp_path, steps=2, every=1)
    run = _only_run(tmp_path / "tb")
    events = EventAccumulator(run, size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert read(run)["grad_norm_preclip"].steps.tolist() == [1, 2]


def test_before_the_trainers_tensorboard_callback_it_still_shares_its_writer(tmp_path):
    trainer, witness = _train(tmp_path, steps=2, every=1, tb_last=True)
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("DiagnosticsCallback") < names.index("TensorBoardCallback")
    run = _only_run(tmp_path / "out" / "runs")
    events = EventAccumulator(run, size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert close(at(read(run), "loss", "total", 2), witness.logs[2]["loss"], rel=1e-6)


@pytest.mark.skipif(not hasattr(Diagnostics, "evaluate"), reason="Diagnostics.evaluate() is not on this branch yet")
def test_the_trainers_evaluation_is_recorded_as_val_loss(tmp_path):
    _, witness = _train(tmp_path, steps=4, every=2, evaluate=True)
    series = read(_only_run(tmp_path / "out" / "runs"))
    assert sorted(witness.evals) == [2, 4]
    assert series["val_loss"].steps.tolist() == [2, 4]
    for step, metrics in witness.evals.items():
        assert close(at(series, "val_loss", "total", step), metrics["eval_loss"], rel=1e-6)
    # The Trainer's speed numbers are not results of the model.
    assert "val_metric" not in series or not any("runtime" in n for n in series["val_metric"].layers)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [({"every": 0}, ValueError, "every"), ({"every": "5"}, TypeError, "every"), ({"include": 3}, TypeError, "include")],
)
def test_bad_options_fail_when_the_callback_is_made(kwargs, error, name):
    with pytest.raises(error, match=name):
        DiagnosticsCallback(**kwargs)


def test_a_trainer_without_the_methods_it_reads_costs_warnings_not_training(tmp_path):
    class Odd(Trainer):
        _get_grad_norm = None  # a Trainer version without it (and without `_clip_grad_norm`)
        _clip_grad_norm = None

        def _inner_training_loop(self, *args, **kwargs):  # never reached past on_train_begin here
            self.callback_handler.on_train_begin(self.args, self.state, self.control)
            self.callback_handler.on_train_end(self.args, self.state, self.control)

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8,
                                       bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=1,
                             disable_tqdm=True)
    data = [{"input_ids": torch.zeros(4, dtype=torch.long), "labels": torch.zeros(4, dtype=torch.long)}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Odd(model=model, args=args, train_dataset=data, callbacks=[DiagnosticsCallback()]).train()
    messages = [str(w.message) for w in caught if issubclass(w.category, DiagnosticsWarning)]
    assert len(messages) == 1 and "_get_grad_norm" in messages[0], messages


def test_importing_the_logger_does_not_import_transformers():
    code = "import sys, tb_diag_logger, tb_diag_logger.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_under_ddp_one_process_writes_the_loss_the_trainer_gathered(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "_hf_ddp_worker.py")
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(sys.path))
        procs.append(subprocess.Popen([sys.executable, worker, str(tmp_path)], env=env, text=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        errors = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for rank, (p, err) in enumerate(zip(procs, errors)):
        assert p.returncode == 0, f"rank {rank} failed:\n{err[-4000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["wrapped"] == "DistributedDataParallel"
    assert ranks[0]["warnings"] == [] and ranks[1]["warnings"] == []
    run = _only_run(tmp_path / "tb")  # one event file: process zero's, with the Trainer's scalars in it
    series = read(run)
    logs = ranks[0]["logs"]
    for step in (1, 2, 3):
        # The Trainer's logged loss is the mean over both processes' batches; so is ours.
        assert close(at(series, "loss", "total", step), logs[str(step)]["loss"], rel=1e-6)
        assert close(at(series, "grad_norm_preclip", "", step), logs[str(step)]["grad_norm"], rel=1e-6)
    assert series["update_ratio"].steps.tolist() == [1, 2, 3]
