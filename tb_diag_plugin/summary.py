"""The writer side of the contract: diagnostics as TensorBoard summaries, without torch.

Beside `metadata.py`, as in TensorBoard's own plugins: `metadata` names what
is recorded, this module encodes it. The logger writes these summaries
through the user's `SummaryWriter` (`tb_diag_logger.summaries.SummarySink`);
tests, fixtures and benchmarks write whole runs with `EventWriter`, which
uses TensorBoard's own event-file writer and never imports torch.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

from tb_diag_plugin import metadata

try:  # CRC-32C in C: TensorBoard's own is pure Python, about 150 ns a byte (benchmarks/RESULTS.md)
    import google_crc32c

    FAST_CRC = getattr(google_crc32c, "implementation", "") == "c"
except ImportError:  # pragma: no cover - depends on the platform's wheels
    google_crc32c = None
    FAST_CRC = False

# (metric, layer names, layer types or (), values): one metric of one logged step.
Item = tuple[str, Sequence[str], Sequence[str], np.ndarray]

__all__ = ["EventWriter", "FAST_CRC", "Item", "VectorEncoder", "fast_records", "frame_record", "masked_crc32c",
           "structure_summary", "vector_summary"]


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C (Castagnoli) of `data`."""
    if not FAST_CRC:
        # TensorBoard's own pure-Python version; imported here, not at start-up (a slow import).
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as slow

        return slow(data)
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """`data` as one TFRecord: its length, the length's masked CRC, the data, the data's masked CRC."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def fast_records(event_file_writer: Any) -> Optional[Callable[[], None]]:
    """Frame the records of a TensorBoard `EventFileWriter` with the C CRC-32C; returns the undo.

    TensorBoard's writer thread checksums every record in pure Python while
    holding the GIL, which stalls the training thread in proportion to the
    bytes written (benchmarks/RESULTS.md, "The event writer's checksum"). The
    bytes written are the same. None (nothing changed) without the C CRC, for
    a writer of another make, or one already changed.
    """
    from tensorboard.summary.writer.record_writer import RecordWriter

    record_writer = getattr(getattr(event_file_writer, "_async_writer", None), "_writer", None)
    if not FAST_CRC or type(record_writer) is not RecordWriter or "write" in vars(record_writer):
        return None

    def write(data: bytes) -> None:
        record_writer._writer.write(frame_record(data))

    record_writer.write = write  # the instance's own: the writer thread looks it up at every record
    return lambda: vars(record_writer).pop("write", None)


def vector_summary(tag: str, values: np.ndarray, meta: Optional[summary_pb2.SummaryMetadata]) -> summary_pb2.Summary:
    """One float32 vector as a TENSOR summary; `meta` only on a tag's first write."""
    arr = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=arr.size)]
        ),
        tensor_content=arr.tobytes(),
    )
    value = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
    if meta is not None:
        value.metadata.CopyFrom(meta)
    return summary_pb2.Summary(value=[value])


def structure_summary(doc: dict[str, Any]) -> summary_pb2.Summary:
    """The module tree (`metadata.check_structure` says what it holds) as a one-blob BLOB_SEQUENCE summary."""
    blob = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]),
        string_val=[blob],
    )
    meta = metadata.create_summary_metadata("structure", (), kind=metadata.STRUCTURE)
    value = summary_pb2.Summary.Value(tag=metadata.STRUCTURE_TAG, tensor=tensor, metadata=meta)
    return summary_pb2.Summary(value=[value])


class VectorEncoder:
    """Encodes one logged step's items as one Summary, each tag's metadata only on its first write.

    One encoder per event file: TensorBoard keeps the metadata of a tag's
    first summary in each file, so a new file needs it again (`new_file`).
    """

    def __init__(self) -> None:
        self._tags_sent: set[str] = set()

    def new_file(self) -> None:
        """The next summaries go to a new event file: send every tag's metadata again."""
        self._tags_sent.clear()

    def encode(self, items: Sequence[Item]) -> summary_pb2.Summary:
        """One Summary holding every item; ValueError for a metric that is not a recorded one of the contract."""
        unknown = [m for m, _, _, _ in items if m not in metadata.METRICS or metadata.METRICS[m].needs]
        if unknown:
            raise ValueError(f"metric {unknown[0]!r} is not in the contract (tb_diag_plugin/metadata.py)")
        summary = summary_pb2.Summary()
        sent = []
        for metric, layers, layer_types, values in items:
            tag = metadata.vector_tag(metric, layers)
            meta = None
            if tag not in self._tags_sent:
                meta = metadata.create_summary_metadata(metric, layers, layer_types)
            summary.value.extend(vector_summary(tag, values, meta).value)
            sent.append(tag)
        # Only once every item encoded: a failed step sends the metadata again with the next one.
        self._tags_sent.update(sent)
        return summary


class EventWriter:
    """Writes diagnostics into a new event file of `logdir` with TensorBoard's own writer (no torch).

    For fixtures, benchmarks and tools that record without training in
    torch; a training loop uses `tb_diag_logger.Diagnostics`, which writes
    the same summaries through the user's `SummaryWriter`. `wall_time`
    defaults to now.
    """

    def __init__(self, logdir: str, max_queue: int = 10, flush_secs: float = 120) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._writer = EventFileWriter(str(logdir), max_queue_size=max_queue, flush_secs=flush_secs)
        fast_records(self._writer)  # lives and dies with this writer: nothing to undo
        self._encoder = VectorEncoder()

    @property
    def path(self) -> str:
        """The event file being written."""
        return self._writer._file_name

    def add_summary(self, summary: summary_pb2.Summary, step: int, wall_time: Optional[float] = None) -> None:
        """Any summary as one event at `step`."""
        event = event_pb2.Event(summary=summary, step=int(step),
                                wall_time=time.time() if wall_time is None else float(wall_time))
        self._writer.add_event(event)

    def write_vectors(self, step: int, items: Sequence[Item], wall_time: Optional[float] = None) -> None:
        """One logged step's (metric, layers, layer_types, values) items as one event."""
        summary = self._encoder.encode(items)
        if summary.value:
            self.add_summary(summary, step, wall_time)

    def write_structure(self, step: int, doc: dict[str, Any], wall_time: Optional[float] = None) -> None:
        """The module tree document (see `metadata.check_structure`)."""
        self.add_summary(structure_summary(doc), step, wall_time)

    def add_scalar(self, tag: str, value: float, step: int, wall_time: Optional[float] = None) -> None:
        """A plain scalar, as `SummaryWriter.add_scalar` writes it (a user's own tag beside diagnostics)."""
        self.add_summary(summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)]),
                         step, wall_time)

    def flush(self) -> None:
        """Write what is queued to disk."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
