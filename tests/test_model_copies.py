"""Issue 21.1: with diagnostics attached, the user's model still saves, pickles and copies, and what
those produce carries no link to the logger (real torch, Lightning and transformers objects)."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from _logger_helpers import at, read
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))


def _train(model: nn.Module, diag: Diagnostics, steps: range, x: torch.Tensor, opt) -> None:
    for step in steps:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        diag.step(step, loss=loss)
        opt.step()


def _assert_bare(model: nn.Module) -> None:
    """No hook and no attribute of ours on any module: what a model without diagnostics has."""
    for name, m in model.named_modules():
        for d in _HOOK_DICTS:
            assert not getattr(m, d), f"{name or 'root'}.{d} = {getattr(m, d)}"
        assert "__reduce_ex__" not in vars(m), name


@pytest.fixture
def attached(tmp_path):
    """A model mid-training with diagnostics attached (writer open, hooks in place)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path / "run"))
    diag = Diagnostics(model, writer, every=1, optimizer=opt)
    x = torch.randn(16, 4)
    _train(model, diag, range(3), x, opt)
    yield model, diag, opt, x, tmp_path
    diag.close()
    writer.close()


def test_pickle_save_and_deepcopy_succeed_without_our_objects(attached):
    model, diag, _, x, _ = attached
    blob = pickle.dumps(model)
    assert b"tb_diag" not in blob  # nothing of ours travels: it loads where tb-diag is absent
    buf = io.BytesIO()
    torch.save(model, buf)
    assert b"tb_diag" not in buf.getvalue()
    for twin in (pickle.loads(blob), copy.deepcopy(model), copy.copy(model)):
        _assert_bare(twin)
        with torch.no_grad():
            assert torch.equal(twin(x), model(x))
    # The original keeps its hooks: diagnostics go on.
    assert model._forward_hooks and model._forward_pre_hooks


def test_saved_model_loads_where_tb_diag_cannot_be_imported(attached):
    model, _, _, x, tmp_path = attached
    path = tmp_path / "model.pt"
    torch.save(model, path)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(x)
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tb_diag_logger", "tb_diag_plugin"):
                    raise ImportError("tb-diag is not installed here")
        sys.meta_path.insert(0, Block())
        import torch
        model = torch.load({str(path)!r}, weights_only=False)
        x = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            torch.save(model(x), {str(tmp_path / "y.pt")!r})
        assert not [m for m in sys.modules if m.startswith("tb_diag")]
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_a_copys_forward_never_feeds_the_originals_statistics(tmp_path):
    """A deep copy run between the original's forward and step() (an EMA or `best` model evaluated
    mid-step, on different data) leaves the logged activation statistics those of the original."""
    x = torch.randn(32, 4)
    other = -10 * torch.ones(32, 4)  # would move every statistic if it were counted

    def run(logdir, with_copy: bool):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        diag = Diagnostics(model, logdir=str(logdir), every=1, optimizer=opt)
        twin = copy.deepcopy(model)
        loss = model(x).pow(2).mean()
        if with_copy:
            twin.train()
            twin(other).sum().backward()  # a training-mode forward with gradients: what capture looks for
        opt.zero_grad()
        loss.backward()
        diag.step(0, loss=loss)
        diag.close()
        return read(logdir), model

    series, model = run(tmp_path / "copy", with_copy=True)
    # Independent: the original's ReLU output for x, by hand.
    with torch.no_grad():
        relu_out = torch.relu(model[0](x)).numpy()
    assert at(series, "act_mean", "1", 0) == pytest.approx(float(relu_out.mean()), rel=1e-5)
    dead = float((relu_out.max(axis=0) <= 0).mean())
    assert at(series, "dead_fraction", "1", 0) == pytest.approx(dead)


def test_averaged_model_and_ema_copy_train_and_evaluate(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    diag = Diagnostics(model, logdir=str(tmp_path / "run"), every=2, optimizer=opt)
    swa = torch.optim.swa_utils.AveragedModel(model)
    ema = copy.deepcopy(model).eval()
    x = torch.randn(16, 4)
    sums = [torch.zeros_like(p) for p in model.parameters()]
    for step in range(6):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        diag.step(step, loss=loss)
        opt.step()
        swa.update_parameters(model)
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 0.1)
        for s, p in zip(sums, model.parameters()):
            s += p.detach()
    diag.close()
    _assert_bare(swa.module)
    _assert_bare(ema)
    # The averaged model holds the mean of the weights after each step (computed here independently).
    for p_avg, s in zip(swa.module.parameters(), sums):
        assert torch.allclose(p_avg, s / 6, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(swa(x)).all() and torch.isfinite(ema(x)).all()


def test_compiled_model_pickles_and_copies(tmp_path):
    model = _model()
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diag = Diagnostics(compiled, logdir=str(tmp_path / "run"), every=1, optimizer=opt)
    x = torch.randn(16, 4)
    _train(compiled, diag, range(2), x, opt)
    for obj in (model, compiled):
        blob = pickle.dumps(obj)
        assert b"tb_diag" not in blob
        twin = copy.deepcopy(obj)
        _assert_bare(getattr(twin, "_orig_mod", twin))
        with torch.no_grad():
            assert torch.allclose(twin(x), model(x))
    diag.close()


class RNNModel(nn.Module):
    """word_language_model's model, small (module level: torch.save pickles the class by name)."""

    def __init__(self, ntoken=50, ninp=16, nhid=16):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, 2, dropout=0.2)
        self.decoder = nn.Linear(nhid, ntoken)

    def forward(self, inp, hidden):
        emb = self.drop(self.encoder(inp))
        out, hidden = self.rnn(emb, hidden)
        return F.log_softmax(self.decoder(self.drop(out)), dim=-1), hidden


def test_word_language_model_style_save_and_reload(tmp_path):
    """The shape of pytorch/examples' word_language_model: an LSTM LM trained with manual SGD and
    clipping, saved whole with torch.save(model, f) when validation improves, reloaded to test."""

    torch.manual_seed(0)
    model = RNNModel()
    data = torch.randint(0, 50, (41, 4))
    diag = Diagnostics(model, logdir=str(tmp_path / "run"), every=5)
    best, lr, path = None, 5.0, tmp_path / "model.pt"
    for epoch in range(2):
        model.train()
        hidden = None
        for i in range(0, 40, 8):
            x, y = data[i : i + 8], data[i + 1 : i + 9]
            model.zero_grad()
            out, hidden = model(x, hidden)
            hidden = tuple(h.detach() for h in hidden)
            loss = F.nll_loss(out.view(-1, 50), y.reshape(-1))
            loss.backward()
            diag.step(epoch * 5 + i // 8, loss=loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
        model.eval()
        with torch.no_grad():
            val = F.nll_loss(model(data[:40], None)[0].view(-1, 50), data[1:41].reshape(-1)).item()
        if best is None or val < best:
            with open(path, "wb") as f:
                torch.save(model, f)
            best = val
    diag.close()
    with open(path, "rb") as f:
        reloaded = torch.load(f, weights_only=False)
    _assert_bare(reloaded)
    reloaded.rnn.flatten_parameters()
    with torch.no_grad():
        again = F.nll_loss(reloaded(data[:40], None)[0].view(-1, 50), data[1:41].reshape(-1)).item()
    assert again == pytest.approx(best, rel=1e-6)


def test_lightning_swa_callback_with_diagnostics(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    from tb_diag_logger.integrations.lightning import DiagnosticsCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, idx):
            (x,) = batch
            return self(x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=16)
    module = Module()
    trainer = lightning.Trainer(
        max_epochs=4, accelerator="cpu", devices=1, default_root_dir=str(tmp_path),
        logger=lightning.loggers.TensorBoardLogger(str(tmp_path), name="run"),
        callbacks=[DiagnosticsCallback(every=2), StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2)],
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(module, data)
    _assert_bare(module)  # the callback removed what it put there
    with torch.no_grad():
        assert torch.isfinite(module(torch.randn(4, 4))).all()
    assert "training_step" not in vars(module)


def test_hf_trainer_model_copies_mid_training_and_checkpoints(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from tb_diag_logger.integrations.transformers import DiagnosticsCallback

    copies = []

    class KeepBest(TrainerCallback):  # what an early-stopping helper does with the live model
        def on_step_end(self, args, state, control, model=None, **kwargs):
            copies.append((copy.deepcopy(model), pickle.dumps(model)))

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))
    data = [{"input_ids": torch.randint(0, 32, (8,)), "labels": torch.randint(0, 32, (8,))} for _ in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4, logging_steps=1,
        report_to=["tensorboard"], save_strategy="steps", save_steps=2, use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[DiagnosticsCallback(every=1), KeepBest()])
    trainer.train()
    assert len(copies) == 4
    ids = torch.randint(0, 32, (2, 8))
    twin, blob = copies[-1]
    _assert_bare(twin)
    twin.eval(), model.eval()  # dropout off in both
    assert b"tb_diag" not in blob
    with torch.no_grad():  # the last copy was taken after the last optimizer step: the same weights
        assert torch.allclose(twin(ids).logits, model(ids).logits, atol=1e-6)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "checkpoint-4"))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)
    _assert_bare(model)  # the callback's close() removed every hook
