"""Retention: every logged step is served, past TensorBoard's default of keeping 10 tensor samples.

20,000 logged steps in one run, written with the contract's writer (cheaply: no training loop, no torch),
served by a real TensorBoard with no samples flag, under both loaders.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tb_diag_plugin.summary import EventWriter
from tbserver import serve

STEPS = 20_000
LAYERS = ["fc1.weight", "fc1.bias", "fc2.weight"]


def _values(step: int) -> np.ndarray:
    return np.array([step, -step, step / 7.0], np.float32)  # exact in float32 for every step here


@pytest.fixture(scope="module")
def long_logdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("retention")
    with EventWriter(str(root / "long"), max_queue=1000) as writer:
        for step in range(STEPS):
            writer.write_vectors(step, [("grad_norm", LAYERS, (), _values(step))])
    return str(root)


@pytest.mark.parametrize("load_fast", [False, True], ids=["python_loader", "rust_data_server"])
def test_every_one_of_20000_steps_is_served_without_samples_flags(long_logdir, load_fast):
    with serve(long_logdir, load_fast=load_fast) as srv:  # no --samples_per_plugin
        srv.wait_for_runs(1, timeout=300)
        deadline = time.monotonic() + 600  # only bounds a hang: the loaders read asynchronously
        while True:
            body = srv.plugin(f"values?run=long&metric=grad_norm&points={2 * STEPS}")
            if body["num_steps"] >= STEPS or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert body["num_steps"] == STEPS
    assert body["steps"] == list(range(STEPS))
    assert body["layers"] == LAYERS
    np.testing.assert_array_equal(np.array(body["values"], np.float32), np.stack([_values(s) for s in range(STEPS)]))
