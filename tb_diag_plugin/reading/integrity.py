"""Damage in a run's event files that TensorBoard only logs, made visible.

Both of TensorBoard's loaders stop reading an event file at the first record
whose checksum fails, and drop a record cut short; the tab would show half a
run with no word of why. This module walks each file's record framing (8-byte
length, masked CRC-32C of the length, data, masked CRC-32C of the data),
remembering where it stopped so that a later call reads only new bytes, and
says in words what is lost.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from tb_diag_plugin.summary import FAST_CRC, masked_crc32c

# A writer that is still running can leave half a record on disk until its
# next flush (SummaryWriter flushes every 120 s by default): an incomplete tail
# is reported only once the file has not changed for longer than that.
STALE_SECONDS = 150.0
# New bytes up to this size are checked inside the request; beyond it a
# background thread checks them and the answer appears on the tab's next poll.
INLINE_BYTES = 8 << 20
_HEADER = struct.Struct("<QI")


PAUSE_EVERY = 512  # records between two calls of a background scan's `pause`


@dataclass
class _FileState:
    offset: int = 0  # start of the first record not yet checked
    records: int = 0
    last_step: Optional[int] = None  # step of the last good record (read only when needed)
    last_good: Optional[tuple[int, int]] = None  # (offset, length) of the last good record's data
    corrupt: Optional[str] = None  # once set, the file is not read again (TensorBoard stops there too)
    size: int = -1  # the size and mtime the last finished scan saw
    mtime: float = 0.0


def _step_of(path: str, where: tuple[int, int]) -> Optional[int]:
    from tensorboard.compat.proto import event_pb2

    try:
        with open(path, "rb") as f:
            f.seek(where[0])
            return event_pb2.Event.FromString(f.read(where[1])).step
    except Exception:
        return None


class EventFileChecker:
    """Checks a run directory's event files incrementally; thread-safe."""

    def __init__(
        self,
        verify_data: Optional[bool] = None,
        background: bool = False,
        pause: Optional[Callable[[], None]] = None,
        inline_bytes: int = INLINE_BYTES,
        pause_every: int = PAUSE_EVERY,
    ) -> None:
        """`pause`, if given, is called by a background scan every `pause_every` records: the plugin
        passes a wait for the requests in flight, so that the scan does not slow the view being drawn.
        New bytes beyond `inline_bytes` in one file are checked in the background (with `background`)."""
        # Without a fast CRC only the lengths' checksums are verified: that finds
        # truncation and damaged headers, not a flipped byte inside a record.
        self.verify_data = FAST_CRC if verify_data is None else verify_data
        self.background = background
        self._pause = pause
        self.inline_bytes = inline_bytes
        self.pause_every = pause_every
        self._closed = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._files: dict[str, _FileState] = {}
        self._busy: set[str] = set()  # files a background scan is reading
        self._lock = threading.Lock()

    def problems(self, run_dir: str, now: Optional[float] = None) -> list[str]:
        """Readable descriptions of the damage in `run_dir`'s event files (not its subdirectories)."""
        now = time.time() if now is None else now
        try:
            names = sorted(n for n in os.listdir(run_dir) if ".tfevents." in n)
        except OSError:
            return []
        out = []
        for name in names:
            path = os.path.join(run_dir, name)
            text = self._check(path, now)
            if text:
                out.append(f"event file {name!r}: {text}")
        return out

    def _check(self, path: str, now: float) -> Optional[str]:
        try:
            st = os.stat(path)
        except OSError:
            with self._lock:
                self._files.pop(path, None)
            return None
        with self._lock:
            if path in self._busy:
                return None  # being checked: the answer comes with a later call
            state = self._files.get(path)
            if state is None or st.st_size < state.size:  # new, or rewritten from scratch
                state = self._files[path] = _FileState()
            stale = state.corrupt is None and (st.st_size != state.size or st.st_mtime != state.mtime)
            if stale and self.background and st.st_size - state.offset > self.inline_bytes:
                if self._closed.is_set():
                    return None
                self._busy.add(path)
                thread = threading.Thread(
                    target=self._scan_in_background, args=(path, state, st), daemon=True,
                    name="tb-diag-integrity",
                )
                self._threads.add(thread)
                thread.start()
                return None
            if stale:
                self._scan(path, state, st.st_size)
            state.size, state.mtime = st.st_size, st.st_mtime
        return self._describe(state, st, now)

    def _scan_in_background(self, path: str, state: _FileState, st: os.stat_result) -> None:
        try:
            self._scan(path, state, st.st_size, self._pause)
            state.size, state.mtime = st.st_size, st.st_mtime
        except Exception:  # never take TensorBoard down; the next call tries again
            pass
        finally:
            with self._lock:
                self._busy.discard(path)
                self._threads.discard(threading.current_thread())

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop the background scans (each at its next pause point) and wait for them."""
        self._closed.set()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)

    @staticmethod
    def _describe(state: _FileState, st: os.stat_result, now: float) -> Optional[str]:
        if state.corrupt is not None:
            return state.corrupt
        tail = st.st_size - state.offset
        if tail > 0 and now - st.st_mtime > STALE_SECONDS:
            return (
                f"ends in an incomplete record ({tail} bytes after byte {state.offset}): the writer stopped "
                "mid-record, so TensorBoard drops that last event"
            )
        return None

    def _scan(self, path: str, state: _FileState, size: int, pause: Optional[Callable[[], None]] = None) -> None:
        try:
            with open(path, "rb") as f:
                self._walk(f, path, state, size, pause)
        except OSError:  # removed or unreadable meanwhile: TensorBoard will say so in its log
            return

    def _walk(self, f, path: str, state: _FileState, size: int, pause: Optional[Callable[[], None]] = None) -> None:
        f.seek(state.offset)
        while state.offset + _HEADER.size <= size:
            if pause is not None and state.records % self.pause_every == 0:
                if self._closed.is_set():
                    return  # closed: the scan is left unfinished
                pause()
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return
            length, length_crc = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                self._corrupt(path, state, "its length field is damaged")
                return
            if state.offset + _HEADER.size + length + 4 > size:
                return  # incomplete: still being written, or truncated
            if self.verify_data:
                data = f.read(length)
                footer = f.read(4)
                if len(data) < length or len(footer) < 4:
                    return  # the file shrank while we read it
                if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                    self._corrupt(path, state, "its checksum does not match its content")
                    return
            else:
                f.seek(length + 4, os.SEEK_CUR)
            state.last_good = (state.offset + _HEADER.size, length)
            state.offset += _HEADER.size + length + 4
            state.records += 1

    def _corrupt(self, path: str, state: _FileState, why: str) -> None:
        step = _step_of(path, state.last_good) if state.last_good else None
        after = f" (the last step read from it is {step})" if step is not None else ""
        state.corrupt = (
            f"record {state.records + 1} at byte {state.offset} is damaged: {why}. TensorBoard stops reading "
            f"this file there, so everything written to it after that point is missing{after}"
        )


    def run_problems(self, logdir: str, run: str) -> list[str]:
        """`problems` of the directory of `run` under `logdir`; none where that is not a local directory."""
        run_dir = run_directory(logdir, run)
        return self.problems(run_dir) if run_dir else []


def run_directory(logdir: str, run: str) -> Optional[str]:
    """The local directory of `run` under `logdir`, or None for remote or multi-directory logdirs."""
    if not logdir or "://" in logdir:
        return None
    path = os.path.normpath(os.path.join(logdir, run)) if run not in ("", ".") else logdir
    return path if os.path.isdir(path) else None
