"""Damaged event files are found and described; healthy and growing files are not flagged."""

from __future__ import annotations

import glob
import os
import time

import numpy as np
import pytest
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

from tb_diag_plugin.reading import integrity
from tb_diag_plugin.summary import EventWriter

LAYERS = ["a.weight", "a.bias"]


def _write(run_dir, steps, start=0):
    with EventWriter(str(run_dir)) as w:
        for s in range(start, start + steps):
            w.write_vectors(s, [("grad_norm", LAYERS, (), np.array([s, s + 1], dtype=np.float32))])
    return sorted(glob.glob(os.path.join(str(run_dir), "events.out.tfevents.*")))[-1]


def _record_offsets(path):
    """Start of every record, walked independently of the module under test."""
    data = open(path, "rb").read()
    offsets, pos = [], 0
    while pos < len(data):
        offsets.append(pos)
        pos += 12 + int.from_bytes(data[pos : pos + 8], "little") + 4
    return offsets


def _old(path):
    t = time.time() - 10 * integrity.STALE_SECONDS
    os.utime(path, (t, t))


def test_masked_crc_matches_tensorboards_own():
    rng = np.random.default_rng(0)
    for n in (0, 1, 8, 100, 4096):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert integrity.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)


def test_healthy_file_has_no_problems(tmp_path):
    _old(_write(tmp_path, 30))
    assert integrity.EventFileChecker().problems(str(tmp_path)) == []


@pytest.mark.skipif(not integrity.FAST_CRC, reason="google-crc32c's C implementation is not installed")
def test_flipped_bytes_inside_a_record_are_named_with_the_last_good_step(tmp_path):
    path = _write(tmp_path, 30)
    offsets = _record_offsets(path)
    data = bytearray(open(path, "rb").read())
    # Record 0 is the file-version event, record k + 1 holds step k: damage step 11's payload.
    pos = offsets[12] + 12 + 20
    data[pos : pos + 4] = b"\xde\xad\xbe\xef"
    open(path, "wb").write(bytes(data))
    (text,) = integrity.EventFileChecker().problems(str(tmp_path))
    assert f"record 13 at byte {offsets[12]}" in text
    assert "checksum does not match" in text and "last step read from it is 10" in text
    assert os.path.basename(path) in text


def test_damaged_length_field_is_found_even_without_data_checksums(tmp_path):
    path = _write(tmp_path, 30)
    offsets = _record_offsets(path)
    data = bytearray(open(path, "rb").read())
    data[offsets[5] + 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    (text,) = integrity.EventFileChecker(verify_data=False).problems(str(tmp_path))
    assert "record 6" in text and "length field is damaged" in text and "last step read from it is 3" in text


def test_incomplete_tail_is_reported_only_once_the_file_is_stale(tmp_path):
    path = _write(tmp_path, 30)
    size = os.path.getsize(path)
    os.truncate(path, size - 7)
    checker = integrity.EventFileChecker()
    assert checker.problems(str(tmp_path)) == []  # a live writer may be mid-flush
    (text,) = checker.problems(str(tmp_path), now=time.time() + 2 * integrity.STALE_SECONDS)
    last = _record_offsets(path)[-1]
    assert f"incomplete record ({size - 7 - last} bytes after byte {last})" in text


def test_growing_file_is_read_incrementally_and_stays_clean(tmp_path):
    path = _write(tmp_path, 10)
    data = open(path, "rb").read()
    cut = _record_offsets(path)[6] + 5  # half-way through a header, as a flush can leave it
    open(path, "wb").write(data[:cut])
    checker = integrity.EventFileChecker()
    assert checker.problems(str(tmp_path)) == []
    state = checker._files[path]
    assert state.records == 6 and state.offset == cut - 5
    open(path, "ab").write(data[cut:])
    assert checker.problems(str(tmp_path), now=time.time() + 1e4) == []
    assert state.records == 11 and state.offset == len(data)


def test_file_rewritten_shorter_is_checked_from_the_start(tmp_path):
    path = _write(tmp_path, 10)
    checker = integrity.EventFileChecker()
    checker.problems(str(tmp_path))
    data, cut = open(path, "rb").read(), _record_offsets(path)[3]
    open(path, "wb").write(data[:cut])
    assert checker.problems(str(tmp_path), now=time.time() + 1e4) == []
    assert checker._files[path].records == 3


def test_run_directory_is_local_only(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert integrity.run_directory(str(tmp_path), "a/b") == str(tmp_path / "a" / "b")
    assert integrity.run_directory(str(tmp_path), ".") == str(tmp_path)
    assert integrity.run_directory(str(tmp_path), "missing") is None
    assert integrity.run_directory("gs://bucket/logs", "a") is None
    assert integrity.run_directory("", "a") is None


def test_big_files_are_checked_in_the_background(tmp_path):
    path = _write(tmp_path, 30)
    data = bytearray(open(path, "rb").read())
    data[_record_offsets(path)[20] + 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    checker = integrity.EventFileChecker(background=True, inline_bytes=0)
    first = checker.problems(str(tmp_path))
    deadline = time.monotonic() + 120  # only bounds a hang
    while not (found := checker.problems(str(tmp_path))) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first == []  # the check is running: the answer comes with a later call
    assert len(found) == 1 and "record 21" in found[0]


def test_a_background_check_waits_while_told_to(tmp_path):
    """The plugin passes a pause (a wait for the requests in flight): the scan calls it every
    `pause_every` records and goes no further until it returns."""
    import threading

    path = _write(tmp_path, 30)
    data = bytearray(open(path, "rb").read())
    data[_record_offsets(path)[20] + 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    go = threading.Event()
    calls = []

    def pause():
        calls.append(1)
        paused.set()
        go.wait(120)

    paused = threading.Event()
    checker = integrity.EventFileChecker(background=True, pause=pause, inline_bytes=0, pause_every=4)
    assert checker.problems(str(tmp_path)) == []
    assert paused.wait(120), "the scan never paused"
    assert len(calls) == 1 and checker.problems(str(tmp_path)) == []  # held at its first pause
    go.set()
    deadline = time.monotonic() + 120  # only bounds a hang
    while not (found := checker.problems(str(tmp_path))) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(found) == 1 and "record 21" in found[0]
    assert len(calls) == 6  # records 0, 4, ..., 20: one pause per 4 records until the damaged one


def test_unreadable_directory_or_vanished_file_is_quiet(tmp_path):
    checker = integrity.EventFileChecker()
    assert checker.problems(str(tmp_path / "nope")) == []
    path = _write(tmp_path, 3)
    checker.problems(str(tmp_path))
    os.remove(path)
    assert checker.problems(str(tmp_path)) == []
