"""Hand the diagnostics summaries (built torch-free in `tb_diag_plugin.summary`) to the user's SummaryWriter."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

from tb_diag_plugin.summary import Item, VectorEncoder, fast_records, structure_summary


class SummarySink:
    """Writes through a SummaryWriter's file writer, sending each tag's metadata once.

    Uses `writer._get_file_writer().add_summary`, what `add_scalar` itself
    uses, so diagnostics land in the same event file as the user's scalars.
    While attached it frames that file's records with the C CRC-32C
    (`tb_diag_plugin.summary.fast_records`: the same bytes, without stalling
    training); `release()` gives the writer back as it was.
    """

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self._encoder = VectorEncoder()
        self._file_writer_id: int | None = None
        self._undo: Optional[Callable[[], None]] = None

    def _file_writer(self):
        fw = self.writer._get_file_writer()
        # A recreated file writer (the user closed theirs) starts a new event
        # file, which needs the metadata again.
        if id(fw) != self._file_writer_id:
            self._file_writer_id = id(fw)
            self._encoder.new_file()
            self.release()
            self._undo = fast_records(getattr(fw, "event_writer", None))
        return fw

    def write_vectors(self, step: int, items: Sequence[Item]) -> None:
        """Write (metric, layers, layer_types, values) items as one event; every metric is one of the contract's."""
        fw = self._file_writer()
        summary = self._encoder.encode(items)
        if summary.value:
            fw.add_summary(summary, step, time.time())

    def write_structure(self, step: int, doc: dict[str, Any]) -> None:
        self._file_writer().add_summary(structure_summary(doc), step, time.time())

    def flush(self) -> None:
        """Flush the writer's event file to disk."""
        self.writer.flush()

    def close(self) -> None:
        """Close the writer (only for a writer that Diagnostics created)."""
        self.release()
        self.writer.close()

    def release(self) -> None:
        """Give the file writer its own record framing back (idempotent)."""
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()
