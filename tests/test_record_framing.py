"""The event records tb-diag frames with the C CRC-32C are the bytes TensorBoard's own writer frames."""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.summary.writer.record_writer import RecordWriter
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_plugin import summary
from tb_diag_plugin.reading import integrity

pytestmark = pytest.mark.skipif(not summary.FAST_CRC, reason="google-crc32c's C implementation is not installed")


def _framed_by_tensorboard(payloads):
    out = io.BytesIO()
    rw = RecordWriter(out)
    for p in payloads:
        rw.write(p)
    return out.getvalue()


def test_a_framed_record_is_the_bytes_tensorboards_record_writer_writes():
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (0, 1, 7, 8, 9, 255, 4096, 20_011)]
    assert b"".join(summary.frame_record(p) for p in payloads) == _framed_by_tensorboard(payloads)


def test_fast_records_writes_the_same_bytes_and_undoes_itself():
    from tensorboard.summary.writer.event_file_writer import _AsyncWriter

    payloads = [bytes([i]) * (100 * i) for i in range(1, 30)]
    buf = io.BytesIO()
    rw = RecordWriter(buf)
    holder = type("EventFileWriterLike", (), {})()
    holder._async_writer = _AsyncWriter(rw, 10, 120)  # TensorBoard's real writing thread
    undo = summary.fast_records(holder)
    assert undo is not None and "write" in vars(rw)
    assert summary.fast_records(holder) is None  # already framed: nothing changed twice
    for p in payloads:
        holder._async_writer.write(p)
    holder._async_writer.flush()
    assert buf.getvalue() == _framed_by_tensorboard(payloads)
    undo()
    assert "write" not in vars(rw) and rw.write.__func__ is RecordWriter.write


def test_a_writer_of_another_make_is_left_alone():
    class OtherRecords:
        def write(self, data):
            raise AssertionError("not ours to change")

    holder = type("W", (), {})()
    holder._async_writer = type("A", (), {})()
    holder._async_writer._writer = OtherRecords()
    assert summary.fast_records(holder) is None and "write" not in vars(holder._async_writer._writer)
    assert summary.fast_records(None) is None


def _record_writer(writer: SummaryWriter) -> RecordWriter:
    return writer._get_file_writer().event_writer._async_writer._writer


def test_diagnostics_frames_the_users_writer_while_attached_and_gives_it_back(tmp_path):
    from tb_diag_logger import Diagnostics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path))
    diag = Diagnostics(model, writer, every=1, optimizer=opt)
    x = torch.randn(32, 8)
    for step in range(5):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        diag.step(step, loss=loss)
        opt.step()
        writer.add_scalar("user/loss", loss.item(), step)
    assert "write" in vars(_record_writer(writer))  # framed with the C CRC once diagnostics write
    diag.close()
    assert "write" not in vars(_record_writer(writer))  # the user's writer frames as before
    writer.add_scalar("user/after", 1.0, 5)
    writer.close()

    (path,) = glob.glob(os.path.join(str(tmp_path), "events.out.tfevents.*"))
    # Every record's two checksums hold (checked independently of the writer), and TensorBoard reads them all.
    checker = integrity.EventFileChecker(verify_data=True)
    os.utime(path, (1.0, 1.0))
    assert checker.problems(str(tmp_path)) == []
    tags = {v.tag for e in EventFileLoader(path).Load() for v in e.summary.value}
    assert {"user/loss", "user/after"} <= tags and any(t.startswith("diagnostics") or "grad_norm" in t for t in tags)
