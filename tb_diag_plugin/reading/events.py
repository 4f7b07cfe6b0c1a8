"""A run's diagnostics read straight from its event files: only the steps and layers a request needs.

One metric of a 20,000-step x 5,000-tensor run is 400 MB of float32: more
than the plugin's cache budget should hold for one metric, and more than
TensorBoard's data server sends in one answer (its gRPC client takes at most
256 MiB). So a metric that does not fit is read here, on demand: one pass over
the files notes where each tensor's bytes lie (step, file, offset; a few bytes
per logged step and tag, kept up to date as the files grow), and a request
then reads only the rows and the span of columns it shows.

The records are walked by their TFRecord framing (as `integrity` does) and
each event's protobuf by its wire format, so that the tensors' bytes are
located, not copied. Every record of every event file of the run directory is
read, in file-name order, as TensorBoard's loaders do; TensorBoard's
retention (`--diagnostics_samples`) is not applied here.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass

import numpy as np

from tb_diag_plugin import metadata

_HEADER = struct.Struct("<QI")
_PREFIX = (metadata.PLUGIN_NAME + "/").encode("utf-8")
_DT_FLOAT = 1
# Bytes read from a file at a time while indexing: the index never holds more of a file than this.
_BLOCK = 16 << 20


class TagRows:
    """Where one tag's tensors lie: for each datum in file order, its step, file and byte range."""

    def __init__(self) -> None:
        self._new: list[tuple[int, int, int, int]] = []  # found by the scan in progress
        self._arrays = tuple(np.zeros(0, dtype=np.int64) for _ in range(4))

    def add(self, step: int, file: int, offset: int, length: int) -> None:
        self._new.append((step, file, offset, length))

    def settle(self) -> None:
        """Move what the last scan found into the arrays (a few int64 per datum, no Python objects)."""
        if self._new:
            new = np.array(self._new, dtype=np.int64).reshape(-1, 4)
            self._arrays = tuple(np.concatenate([a, new[:, i]]) for i, a in enumerate(self._arrays))
            self._new = []

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(steps, files, offsets, lengths) as int64 arrays, one entry per datum in file order."""
        return self._arrays


@dataclass
class _File:
    path: str
    offset: int = 0  # the first record not yet indexed


class EventIndex:
    """The byte ranges of every float32 tensor of the plugin's tags in one run directory; thread-safe."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self._files: list[_File] = []
        self._tags: dict[str, TagRows] = {}
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Index what was appended to the run's event files since the last call (new files included)."""
        with self._lock:
            try:
                names = sorted(n for n in os.listdir(self.run_dir) if ".tfevents." in n)
            except OSError:
                return
            known = {f.path for f in self._files}
            self._files += [_File(os.path.join(self.run_dir, n)) for n in names
                            if os.path.join(self.run_dir, n) not in known]
            for i, f in enumerate(self._files):
                self._scan(i, f)
            for rows in self._tags.values():
                rows.settle()

    def tag(self, tag: str) -> TagRows:
        """Where `tag`'s data lie (empty when the files hold none)."""
        with self._lock:
            return self._tags.get(tag) or TagRows()

    def read(self, tag: str, rows: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """float32 [len(rows), hi - lo]: columns lo..hi-1 of the tag's data number `rows` (file order)."""
        t = self.tag(tag)
        _, files, offsets, lengths = t.arrays()
        out = np.empty((len(rows), hi - lo), dtype="<f4")
        if not len(rows):
            return out.astype(np.float32, copy=False)
        width = hi - lo
        # One read per datum, into its row of `out`: no copy of the file's bytes, nothing else held.
        for fno in np.unique(files[rows]):
            sel = np.flatnonzero(files[rows] == fno)
            fd = os.open(self._files[int(fno)].path, os.O_RDONLY)
            try:
                for i in sel:
                    r = rows[i]
                    if lengths[r] < 4 * hi:
                        raise ValueError(f"tag {tag!r}: datum {r} holds {lengths[r] // 4} values, not {hi}")
                    if os.preadv(fd, [out[i].data], int(offsets[r]) + 4 * lo) != 4 * width:  # into the row
                        raise OSError(f"{self._files[int(fno)].path} is shorter than when it was indexed")
            finally:
                os.close(fd)
        return out.astype(np.float32, copy=False)

    # ----------------------------------------------------------- indexing
    def _scan(self, fno: int, f: _File) -> None:
        try:
            size = os.path.getsize(f.path)
            fh = open(f.path, "rb")
        except OSError:
            return
        with fh:
            while f.offset + _HEADER.size <= size:
                fh.seek(f.offset)
                block = fh.read(min(_BLOCK, size - f.offset))
                used = self._records(fno, f.offset, block)
                if used == 0:
                    if len(block) >= _BLOCK:  # one record longer than a block: read it alone
                        length = _HEADER.unpack_from(block)[0]
                        fh.seek(f.offset)
                        block = fh.read(_HEADER.size + length + 4)
                        used = self._records(fno, f.offset, block)
                    if used == 0:
                        return  # an incomplete record: the writer has not finished it
                f.offset += used

    def _records(self, fno: int, base: int, block: bytes) -> int:
        """Index the complete records at the start of `block` (which starts at file offset `base`);
        returns the bytes they take."""
        pos = 0
        view = memoryview(block)
        while pos + _HEADER.size <= len(block):
            length = _HEADER.unpack_from(block, pos)[0]
            end = pos + _HEADER.size + length + 4
            if end > len(block):
                break
            start = pos + _HEADER.size
            try:
                self._event(fno, base, view, start, start + length)
            except (IndexError, ValueError, UnicodeDecodeError):
                break  # a damaged record: TensorBoard stops reading the file there too (see `integrity`)
            pos = end
        return pos

    def _event(self, fno: int, base: int, buf: memoryview, pos: int, end: int) -> None:
        """Index one Event's float32 tensors of the plugin's tags (the protobuf read by its wire format)."""
        step = 0
        summaries = []
        while pos < end:
            key, pos = _varint(buf, pos)
            num, wire = key >> 3, key & 7
            if num == 2 and wire == 0:
                step, pos = _varint(buf, pos)
            elif num == 5 and wire == 2:
                n, pos = _varint(buf, pos)
                summaries.append((pos, pos + n))
                pos += n
            else:
                pos = _skip(buf, pos, wire)
        for s_pos, s_end in summaries:
            while s_pos < s_end:
                key, s_pos = _varint(buf, s_pos)
                if key >> 3 == 1 and key & 7 == 2:  # Summary.value
                    n, s_pos = _varint(buf, s_pos)
                    self._value(fno, base, buf, s_pos, s_pos + n, step)
                    s_pos += n
                else:
                    s_pos = _skip(buf, s_pos, key & 7)

    def _value(self, fno: int, base: int, buf: memoryview, pos: int, end: int, step: int) -> None:
        tag = None
        tensor = None
        while pos < end:
            key, pos = _varint(buf, pos)
            num, wire = key >> 3, key & 7
            if wire == 2:
                n, pos = _varint(buf, pos)
                if num == 1:
                    tag = bytes(buf[pos:pos + n])
                elif num == 8:
                    tensor = (pos, pos + n)
                pos += n
            else:
                pos = _skip(buf, pos, wire)
        if tag is None or tensor is None or not tag.startswith(_PREFIX):
            return
        pos, end = tensor
        dtype, content = 0, None
        while pos < end:
            key, pos = _varint(buf, pos)
            num, wire = key >> 3, key & 7
            if num == 1 and wire == 0:
                dtype, pos = _varint(buf, pos)
            elif wire == 2:
                n, pos = _varint(buf, pos)
                if num in (4, 5):  # tensor_content, or float_val packed: both little-endian float32
                    content = (pos, n)
                pos += n
            else:
                pos = _skip(buf, pos, wire)
        if dtype != _DT_FLOAT or content is None:
            return  # not what the logger writes: the data provider's reading handles it
        rows = self._tags.get(tag.decode("utf-8"))
        if rows is None:
            rows = self._tags[tag.decode("utf-8")] = TagRows()
        rows.add(step, fno, base + content[0], content[1])


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _skip(buf: memoryview, pos: int, wire: int) -> int:
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        n, pos = _varint(buf, pos)
        return pos + n
    if wire == 5:
        return pos + 4
    raise ValueError(f"unsupported protobuf wire type {wire}")
