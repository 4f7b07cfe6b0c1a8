"""Build diagnostics summaries and hand them to the user's SummaryWriter."""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

import numpy as np
from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

from tb_diag_plugin import metadata


def vector_summary(tag: str, values: np.ndarray, meta: summary_pb2.SummaryMetadata | None) -> summary_pb2.Summary:
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
    """The module tree as a one-blob BLOB_SEQUENCE summary (JSON, UTF-8)."""
    blob = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]),
        string_val=[blob],
    )
    meta = metadata.create_summary_metadata("structure", (), kind=metadata.STRUCTURE)
    value = summary_pb2.Summary.Value(tag=metadata.STRUCTURE_TAG, tensor=tensor, metadata=meta)
    return summary_pb2.Summary(value=[value])


class SummarySink:
    """Writes through a SummaryWriter's file writer, sending each tag's metadata once.

    Uses `writer._get_file_writer().add_summary`, what `add_scalar` itself
    uses, so diagnostics land in the same event file as the user's scalars.
    """

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self._tags_sent: dict[str, int] = {}
        self._file_writer_id: int | None = None

    def _file_writer(self):
        fw = self.writer._get_file_writer()
        # A recreated file writer (the user closed theirs) starts a new event
        # file, which needs the metadata again.
        if id(fw) != self._file_writer_id:
            self._file_writer_id = id(fw)
            self._tags_sent.clear()
        return fw

    def write_vectors(self, step: int, items: Sequence[tuple[str, Sequence[str], Sequence[str], np.ndarray]]) -> None:
        """Write (metric, layers, layer_types, values) items as one event; every metric is one of the contract's."""
        unknown = [m for m, _, _, _ in items if m not in metadata.METRICS or metadata.METRICS[m].needs]
        if unknown:
            raise ValueError(f"metric {unknown[0]!r} is not in the contract (tb_diag_plugin/metadata.py)")
        fw = self._file_writer()
        summary = summary_pb2.Summary()
        for metric, layers, layer_types, values in items:
            tag = metadata.vector_tag(metric, layers)
            meta = None
            if tag not in self._tags_sent:
                meta = metadata.create_summary_metadata(metric, layers, layer_types)
            summary.value.extend(vector_summary(tag, values, meta).value)
        if summary.value:
            fw.add_summary(summary, step, time.time())
        for metric, layers, _, _ in items:
            self._tags_sent[metadata.vector_tag(metric, layers)] = step

    def write_structure(self, step: int, doc: dict[str, Any]) -> None:
        self._file_writer().add_summary(structure_summary(doc), step, time.time())

    def flush(self) -> None:
        """Flush the writer's event file to disk."""
        self.writer.flush()

    def close(self) -> None:
        """Close the writer (only for a writer that Diagnostics created)."""
        self.writer.close()
