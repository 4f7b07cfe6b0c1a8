"""Findings at the scale of thousands of tensors (issue 24): the per-tensor spike pass done for all
columns at once equals the per-column detector."""

from __future__ import annotations

import numpy as np
import pytest

from tb_diag_plugin.findings.context import step_noise, step_noise_columns
from tb_diag_plugin.findings.rules.spikes import column_spikes, spikes
from tb_diag_plugin.findings.thresholds import Thresholds


def _planted(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    """Log-normal norms with a drift, planted spikes (x3 to x1000), NaN, +inf, zeros and negatives."""
    v = np.exp(rng.normal(0.0, rng.uniform(0.05, 1.5), (n, width)) - np.log1p(np.arange(n) / 50)[:, None])
    u = rng.random((n, width))
    v[u < 0.06] *= rng.uniform(3.0, 1000.0, int((u < 0.06).sum()))
    v[(u >= 0.06) & (u < 0.08)] = np.nan
    v[(u >= 0.08) & (u < 0.09)] = np.inf
    v[(u >= 0.09) & (u < 0.10)] = 0.0
    v[(u >= 0.10) & (u < 0.105)] = -1.0
    return v


@pytest.mark.parametrize("seed", range(4))
def test_the_columns_at_once_find_what_each_column_alone_finds(seed):
    rng = np.random.default_rng(seed)
    th = Thresholds()
    found = 0
    for n in (1, 3, 4, 5, 7, 20, 21, 22, 60, 300):
        width = int(rng.integers(1, 40))
        v = _planted(rng, n, width)
        v[:, 0] = np.nan  # a column never recorded
        if width > 2:
            v[: n // 2, 1] = np.nan  # one recorded only from the middle on
        want = {j: s for j in range(width) if (s := spikes(v[:, j], th, draws=width))}
        assert column_spikes(v, th, draws=width) == want, n
        found += sum(map(len, want.values()))
    assert found > 0  # the planted spikes are found, so the comparison compares something


def test_columns_wider_than_one_block_are_searched_block_by_block(monkeypatch):
    from tb_diag_plugin.findings.rules import spikes as rules

    rng = np.random.default_rng(7)
    th = Thresholds()
    v = _planted(rng, 120, 50)
    want = {j: s for j in range(50) if (s := spikes(v[:, j], th, draws=50))}
    monkeypatch.setattr(rules, "_BLOCK_BYTES", 8 * 120 * 7)  # blocks of 7 columns
    assert column_spikes(v, th, draws=50) == want and want


@pytest.mark.parametrize("seed", range(3))
def test_each_columns_step_noise_equals_the_series_step_noise(seed):
    rng = np.random.default_rng(seed)
    for n in (1, 2, 3, 4, 5, 9, 40, 201):
        x = rng.normal(0.0, rng.uniform(0.01, 3.0), (n, 12))
        x[rng.random(x.shape) < 0.2] = np.nan
        x[:, 3] = np.nan
        x[:, 4] = 1.5  # constant: no noise at all
        got = step_noise_columns(x)
        assert got.tolist() == [step_noise(x[:, j]) for j in range(12)], n
