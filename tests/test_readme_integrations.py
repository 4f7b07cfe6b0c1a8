"""The README's Hugging Face Trainer and accelerate snippets, run verbatim on tiny models."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from _logger_helpers import read
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def snippet(marker: str) -> str:
    """The ```python block that follows `<!-- readme-test: marker -->` in README.md, as written."""
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"<!-- readme-test: {re.escape(marker)} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no snippet marked {marker!r}"
    return m.group(1)


def test_readme_hugging_face_trainer_snippet(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    # 160 samples at the default batch of 8, default 3 epochs: 60 optimizer steps, logged at 1, 20, 40, 60.
    ids = torch.randint(0, 96, (160, 8))
    train_ds = [{"input_ids": row, "labels": row} for row in ids]
    exec(snippet("hf-trainer"), {"model": model, "train_ds": train_ds})

    (run,) = [d for d, _, files in os.walk(tmp_path / "out" / "runs") if any("tfevents" in f for f in files)]
    assert len([f for f in os.listdir(run) if "tfevents" in f]) == 1
    series = read(run)
    assert series["loss"].steps.tolist() == [1, 20, 40, 60]
    assert series["grad_norm_preclip"].steps.tolist() == [1, 20, 40, 60]
    events = EventAccumulator(run, size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [10, 20, 30, 40, 50, 60]


def test_readme_accelerate_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.utils.data.TensorDataset(torch.randn(41 * 8, 6), torch.randint(0, 3, (41 * 8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    exec(snippet("accelerate"), {"model": model, "opt": opt, "loader": loader})

    series = read(tmp_path / "runs" / "accel")
    for metric in ("loss", "grad_norm_preclip", "grad_norm_total", "update_ratio", "dead_fraction"):
        assert series[metric].steps.tolist() == [0, 20, 40], metric
    ratios = series["update_ratio"]
    assert set(ratios.layers) == {n for n, _ in model.named_parameters()}
    assert (ratios.values[ratios.present] > 0).all()
