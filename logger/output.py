"""Where `Diagnostics` writes: decided once per process (only `write_rank` writes, so a job has one
event stream), a writer of our own closed at `close()`, queued events flushed at exit. Every vector a
step writes passes `Output.emit`, where the observers (in-process findings) see it first."""

from __future__ import annotations

import atexit
import functools
import os
import weakref
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tb_diag_logger import distributed
from tb_diag_logger.collectors import Item, Part, to_host
from tb_diag_logger.summaries import SummarySink


class Output:
    """The summary sink of the writing rank (None elsewhere); every write failure is one warning."""

    def __init__(self, writer: Any, logdir: Optional[str], write_rank: int,
                 report: Callable[[str, BaseException], None], before_exit: Callable[[], None]) -> None:
        """`before_exit`: what to write when the program ends before `close()` (values still pending)."""
        self.sink: Optional[SummarySink] = None
        self._writer_arg = writer
        self._logdir = os.fspath(logdir) if logdir is not None else None
        self._write_rank = int(write_rank)
        self._report = report
        self._before_exit = before_exit
        self._ready = False
        self._own_writer = False
        self._exit_hook: Optional[Callable[[], None]] = None
        self._closed = False
        self.observers: list[Callable[[int, list[Item]], None]] = []  # see every item before it is written

    def ensure(self) -> None:
        """Decide once whether this process writes; create our own writer only on the writing rank.
        Called at the first step() without torch.distributed, so that a Diagnostics created before
        init_process_group still lets only `write_rank` write (and create files)."""
        if self._ready:
            return
        self._ready = True
        writer, self._writer_arg = self._writer_arg, None
        if distributed.rank() != self._write_rank:
            if not distributed.initialized():
                self._report("write_rank", ValueError(
                    f"write_rank={self._write_rank} but torch.distributed is not initialized: nothing is written"))
            return
        try:
            if writer is None:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(self._logdir)
                self._own_writer = True
            self.sink = SummarySink(writer)
        except Exception as e:  # a logdir we cannot create: one warning, nothing written
            self._report("writing the event file", e)
            return
        # Events still queued in the writer when the program ends (an uncaught KeyboardInterrupt) are flushed.
        self._exit_hook = functools.partial(_at_exit, weakref.ref(self))
        atexit.register(self._exit_hook)

    def write(self, method: str, *args: Any) -> None:
        """Call a sink method on the writing rank; a failing disk or a removed logdir is one warning."""
        if self.sink is None:
            return
        try:
            getattr(self.sink, method)(*args)
        except Exception as e:
            self._report("writing the event file", e)

    def emit(self, step: int, items: list[Item]) -> None:
        """The one place a step's items pass before they are written: the observers see them first."""
        for observe in self.observers:
            try:
                observe(step, items)
            except Exception as e:  # an observer's failure costs only itself
                self._report("an observer of the logged values", e)
        self.write("write_vectors", step, items)

    def write_late(self, late: Sequence[tuple[int, Sequence[Part]]], device: Any,
                   values: Optional[Sequence[np.ndarray]] = None) -> None:
        """Write each earlier step's parts (the collectors' `late()`) under its own step: from their host
        `values` (in order) when a logged step's copy carried them, else in one copy of their own."""
        if not late or self.sink is None:
            return
        if values is None:
            values = to_host([p for _, parts in late for p in parts], device)
        at = 0
        for step, parts in late:
            self.emit(step, [(p.metric, p.names, p.types, v) for p, v in zip(parts, values[at:at + len(parts)])])
            at += len(parts)

    def close(self) -> None:
        """Close a writer we created, flush the user's. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._exit_hook is not None:
            atexit.unregister(self._exit_hook)
            self._exit_hook = None
        self.write("close" if self._own_writer else "flush")
        self.write("release")  # the user's writer frames its records as it did before us

    def _at_exit(self) -> None:
        if self._closed or self.sink is None:
            return
        try:
            self._before_exit()
            self.sink.close() if self._own_writer else self.sink.flush()
        except Exception:
            pass  # the interpreter is going away: nothing left to warn


def _at_exit(ref: weakref.ReferenceType[Output]) -> None:
    out = ref()
    if out is not None:
        out._at_exit()
