"""The model input's scale (`input_mean`, `input_std`, issue 22: inputs not normalised) against numpy,
read back from the event files; integer inputs (token ids) are not recorded."""

from __future__ import annotations

import numpy as np
import torch
from _logger_helpers import at, read, recorded
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics


def test_input_mean_and_std_pool_every_training_forward_of_a_logged_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    writer = SummaryWriter(str(tmp_path))
    seen: dict[int, list[np.ndarray]] = {}
    with Diagnostics(model, writer, optimizer=opt, every=2) as diag:
        for step in range(4):
            opt.zero_grad()
            for micro in range(2):  # gradient accumulation: two forwards before step()
                x = 1000.0 + 50.0 * torch.randn(6 + micro, 5)  # a large common offset, raw scale
                seen.setdefault(step, []).append(x.numpy().copy())
                model(x).sum().backward()
            with torch.no_grad():
                model(torch.randn(3, 5) * 1e6)  # an evaluation forward: not training input
            diag.step(step)
            opt.step()
    writer.close()
    s = read(tmp_path)
    for step in (0, 2):
        x = np.concatenate([a.reshape(-1) for a in seen[step]]).astype(np.float64)
        assert np.isclose(at(s, "input_mean", "", step), x.mean(), rtol=1e-5)
        assert np.isclose(at(s, "input_std", "", step), x.std(), rtol=1e-3)
    assert not recorded(s, "input_std", "", 1)  # logged steps only


def test_token_ids_are_not_an_input_scale(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    writer = SummaryWriter(str(tmp_path))
    with Diagnostics(model, writer, every=1) as diag:
        model(torch.randint(0, 10, (3, 7))).sum().backward()
        diag.step(0)
    writer.close()
    assert "input_std" not in read(tmp_path)
