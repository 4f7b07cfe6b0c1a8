"""A training process appends while TensorBoard reads: no broken or partial step is ever served."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from tbserver import serve

SECONDS = float(os.environ.get("TB_DIAG_LIVE_SECONDS", "60"))

TRAINER = textwrap.dedent(
    """
    import os, sys, time, torch
    from torch import nn
    from tb_diag_logger import Diagnostics
    torch.set_num_threads(1)
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(16, 16), nn.ReLU())])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 16)
    end = time.monotonic() + 900  # only bounds a hang: the test says when to stop
    step = 0
    with Diagnostics(model, logdir=sys.argv[1], every=1, optimizer=opt) as diag:
        while not os.path.exists(sys.argv[2]) and time.monotonic() < end:
            loss = model(x).pow(2).mean()
            opt.zero_grad(); loss.backward()
            diag.step(step, loss=loss, losses={"a": loss * 0.5, "b": loss * 0.5})
            opt.step()
            if step % 20 == 0:
                diag._sink.flush()  # make appends visible to the reader often
            step += 1
            time.sleep(0.005)
    print(step)
    """
)


@pytest.mark.parametrize("load_fast", [False, True], ids=["python_loader", "rust_data_server"])
def test_live_run_never_shows_partial_steps(tmp_path, load_fast):
    run_dir = tmp_path / "live"
    stop = tmp_path / "stop"
    watch_until = time.monotonic() + SECONDS / 2  # both backends together take SECONDS
    hang = time.monotonic() + 600
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(run_dir), str(stop)], stdout=subprocess.PIPE, text=True
    )
    seen_counts = []
    try:
        with serve(str(tmp_path), load_fast=load_fast) as srv:
            srv.wait_for_runs(1, timeout=60)
            while proc.poll() is None:
                for metric, width in (("grad_norm", 16), ("loss", 3), ("dead_fraction", 8), ("update_ratio", 16)):
                    status, _, _ = srv.get(f"data/plugin/diagnostics/values?run=live&metric={metric}")
                    if status == 404:
                        continue  # the metric's first step has not been read yet
                    body = srv.plugin(f"values?run=live&metric={metric}&points=100000")
                    steps = body["steps"]
                    assert steps == sorted(set(steps)), "steps repeated or out of order"
                    assert len(body["layers"]) == width
                    for row in body["values"]:
                        assert len(row) == width and all(isinstance(v, float) for v in row), row
                    if metric == "grad_norm":
                        seen_counts.append(body["num_steps"])
                # Watched long enough, and the run was seen growing past 50 steps (slow on a busy machine).
                grown = len(set(seen_counts)) >= 3 and seen_counts[-1] > 50
                if (grown and time.monotonic() > watch_until) or time.monotonic() > hang:
                    stop.touch()
                time.sleep(0.2)
    finally:
        stop.touch()
        proc.wait(timeout=120)
    total = int(proc.stdout.read().strip())
    assert total > 50
    assert len(seen_counts) >= 3 and seen_counts == sorted(seen_counts), "history went backwards"
    assert seen_counts[-1] > seen_counts[0], "no new steps seen while training ran"
