"""TensorBoard's data provider, and the private parts of it the plugin reads for speed.

Every use of a TensorBoard internal lives in this module. Each is named in
`INTERNALS` with the public call that gives the same answer, and each falls
back to that call where it does not apply (another loader, another
TensorBoard version). Callers pass `internals=()` to use the public API only;
tests/test_provider.py compares both under both loaders.
"""

from __future__ import annotations

from typing import Any, Collection, Optional

import numpy as np

from tb_diag_plugin import metadata

# `downsample` for "every stored sample" (0 would mean none).
ALL_SAMPLES = 2**62

# internal -> the public call it stands in for, and why it is worth it.
INTERNALS: dict[str, str] = {
    # `list_tensors` under the Python loader walks every event of every tag to find the largest
    # step (seconds for a logdir of big runs, at every poll); the multiplexer's latest event is enough.
    "multiplexer_listing": "MultiplexerDataProvider._multiplexer / ._index instead of list_tensors",
    # Both providers turn each step into a numpy array in Python; joining the raw float32 payloads of
    # the loaded protos is one copy.
    "grpc_read_tensors": "GrpcDataProvider._stub.ReadTensors instead of read_tensors",
    "multiplexer_tensors": "MultiplexerDataProvider._multiplexer.Tensors instead of read_tensors",
}

Listing = dict[str, dict[str, tuple[bytes, tuple]]]  # run -> tag -> (plugin content, stamp)


def applies(name: str, provider: Any) -> bool:
    """Whether the internal `name` can serve `provider` (the loader TensorBoard was started with)."""
    if name not in INTERNALS:
        raise ValueError(f"name must be one of {sorted(INTERNALS)}, got {name!r}")
    if name == "grpc_read_tensors":
        return type(provider).__name__ == "GrpcDataProvider" and getattr(provider, "_stub", None) is not None
    mux = _multiplexer(provider)
    return mux is not None and (name != "multiplexer_listing" or getattr(provider, "_index", None) is not None)


def list_tensors(provider, ctx, experiment_id: str, internals: Collection[str] = INTERNALS) -> Listing:
    """Our tensor tags per run, each with its plugin content and a stamp that changes when it gains a step.

    A stamp is (max step, max wall time) from the public listing, or (latest step, its wall time,
    count) from the multiplexer's.
    """
    listing = _multiplexer_listing(provider) if "multiplexer_listing" in internals else None
    if listing is not None:
        return listing
    return {
        run: {tag: (ts.plugin_content, (ts.max_step, ts.max_wall_time)) for tag, ts in tags.items()}
        for run, tags in provider.list_tensors(
            ctx, experiment_id=experiment_id, plugin_name=metadata.PLUGIN_NAME
        ).items()
    }


def read_columns(
    provider, ctx, experiment_id: str, run: str, entries: list, downsample: int,
    internals: Collection[str] = INTERNALS,
) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """tag -> (steps, float32 matrix [S, width], number of data of the wrong shape skipped)."""
    columns = _read_raw(provider, experiment_id, run, entries, downsample, internals)
    if columns is not None:
        return columns
    from tensorboard.data import provider as tb_provider

    result = provider.read_tensors(
        ctx,
        experiment_id=experiment_id,
        plugin_name=metadata.PLUGIN_NAME,
        run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=[t for t, _ in entries]),
        downsample=downsample,
    )
    data = result.get(run, {})
    return {
        tag: columns_of([d.step for d in data.get(tag, [])], [d.numpy for d in data.get(tag, [])], len(pd.layers))
        for tag, pd in entries
    }


def columns_of(steps: list[int], values: list[Any], width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(steps, matrix [S, width] float32, number skipped) from one tag's data, skipping wrong shapes."""
    arrays = [_as_vector(v) for v in values]
    keep = [i for i, a in enumerate(arrays) if a is not None and a.size == width]
    matrix = np.stack([arrays[i] for i in keep]) if keep else np.zeros((0, width), dtype=np.float32)
    return np.array([steps[i] for i in keep], dtype=np.int64), matrix, len(arrays) - len(keep)


def _as_vector(value: Any) -> Optional[np.ndarray]:
    try:
        arr = np.asarray(value)
    except Exception:
        return None
    if arr.dtype.kind not in "fiu":
        return None
    return arr.reshape(-1).astype(np.float32, copy=False)


def _multiplexer(provider):
    """The event multiplexer behind TensorBoard's Python loader (`--load_fast false`), or None."""
    if type(provider).__name__ != "MultiplexerDataProvider":
        return None
    return getattr(provider, "_multiplexer", None)


def _multiplexer_listing(provider) -> Optional[Listing]:
    """Internal "multiplexer_listing": the Python loader's listing without a walk over every event, or None."""
    mux = _multiplexer(provider)
    index = getattr(provider, "_index", None)
    if mux is None or index is None:
        return None
    try:
        from tensorboard.compat.proto import summary_pb2

        out: Listing = {}
        for run, tags in index(metadata.PLUGIN_NAME, None, summary_pb2.DATA_CLASS_TENSOR).items():
            found = out[run] = {}
            for tag, summary_metadata in tags.items():
                events = mux.Tensors(run, tag)
                last = events[-1] if events else None
                stamp = (last.step, last.wall_time, len(events)) if last is not None else (None, None, 0)
                found[tag] = (summary_metadata.plugin_data.content, stamp)
        return out
    except Exception:  # another TensorBoard version: the public listing
        return None


def _read_raw(provider, experiment_id, run, entries, downsample, internals):
    """The tensors' bytes straight from TensorBoard's loaded protos, joined with one copy; None where
    no internal applies (the caller then uses `read_tensors`)."""
    found = None
    if "grpc_read_tensors" in internals:
        found = _grpc_protos(provider, experiment_id, run, entries, downsample)
    if found is None and "multiplexer_tensors" in internals:
        found = _multiplexer_protos(provider, run, entries, downsample)
    if found is None:
        return None
    from tensorboard.util import tensor_util

    out = {}
    for tag, pd in entries:
        steps, values = found.get(tag, ([], []))
        width = len(pd.layers)
        if not values:
            out[tag] = (np.zeros(0, dtype=np.int64), np.zeros((0, width), dtype=np.float32), 0)
            continue
        contents = [v.tensor_content for v in values]
        if {v.dtype for v in values} <= {1} and all(len(c) == 4 * width for c in contents):
            # DT_FLOAT tensors of the right length (the logger's own output): one copy, read-only.
            matrix = np.frombuffer(b"".join(contents), dtype="<f4").reshape(len(values), width)
            if not matrix.dtype.isnative:
                matrix = matrix.astype(np.float32)
            out[tag] = (np.array(steps, dtype=np.int64), matrix, 0)
        else:
            out[tag] = columns_of(list(steps), [_quiet_ndarray(tensor_util, v) for v in values], width)
    return out


def _grpc_protos(provider, experiment_id, run, entries, downsample):
    """Internal "grpc_read_tensors": tag -> (steps, TensorProtos) from one ReadTensors call, or None."""
    if not applies("grpc_read_tensors", provider):
        return None
    try:
        from tensorboard.data.proto import data_provider_pb2

        req = data_provider_pb2.ReadTensorsRequest(experiment_id=experiment_id)
        req.plugin_filter.plugin_name = metadata.PLUGIN_NAME
        req.run_tag_filter.runs.names[:] = [run]
        req.run_tag_filter.tags.names[:] = sorted(t for t, _ in entries)
        req.downsample.num_points = downsample
        res = provider._stub.ReadTensors(req)
    except Exception:
        return None
    found = {}
    for run_entry in res.runs:
        if run_entry.run_name != run:
            continue
        for tag_entry in run_entry.tags:
            found[tag_entry.tag_name] = (tag_entry.data.step, list(tag_entry.data.value))
    return found


def _multiplexer_protos(provider, run, entries, downsample):
    """Internal "multiplexer_tensors": tag -> (steps, TensorProtos) from the Python loader, or None.

    Only when every stored sample is wanted (the loader has already applied
    its retention; `downsample` would otherwise pick a subset).
    """
    mux = _multiplexer(provider)
    if mux is None or downsample != ALL_SAMPLES:
        return None
    found = {}
    try:
        for tag, _ in entries:
            try:
                events = mux.Tensors(run, tag)
            except KeyError:  # the run or tag went away since the listing
                continue
            found[tag] = ([e.step for e in events], [e.tensor_proto for e in events])
    except Exception:
        return None
    return found


def _quiet_ndarray(tensor_util, value):
    try:
        return tensor_util.make_ndarray(value)
    except Exception:
        return None
