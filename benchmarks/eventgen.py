"""Large synthetic event files, written fast, byte-for-byte what the writers produce.

TensorBoard's own record writer computes CRC-32C in pure Python (about 5 MB/s
here), which would make a 20,000-step x 500-layer run take minutes to write.
This module frames records itself with a CRC-32C vectorised over many records
at once (numpy), and builds:

* a Diagnostics run through the contract's own encoder
  (`tb_diag_plugin.summary`: the exact summaries, metadata and tags the
  logger writes; no torch), and
* the baseline: the same `grad_norm` numbers as one `add_scalar` per layer
  per step (`Summary.Value(tag, simple_value)`, one event each, as torch's
  `SummaryWriter.add_scalar` writes them), hand-encoded with numpy and checked
  against protobuf's own serialisation.
"""

from __future__ import annotations

import os
import struct
import time
from typing import Callable, Sequence

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from tb_diag_plugin import metadata
from tb_diag_plugin.summary import VectorEncoder, structure_summary

# The per-parameter metrics of a synthetic run (what the logger of issue 6 wrote): the layer drill-down
# of `reading.py` asks for each of them.
PARAM_METRICS = ("grad_norm", "grad_max_abs", "grad_nonfinite", "weight_norm", "update_ratio")


def _crc_table() -> np.ndarray:
    poly = 0x82F63B78
    table = np.zeros(256, dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table[i] = c
    return table


_TABLE = _crc_table()


def masked_crc32c_rows(data: np.ndarray) -> np.ndarray:
    """Masked CRC-32C (TFRecord framing) of each row of a uint8 [N, n] array."""
    crc = np.full(data.shape[0], 0xFFFFFFFF, dtype=np.uint32)
    for i in range(data.shape[1]):
        crc = _TABLE[(crc ^ data[:, i]) & 0xFF] ^ (crc >> 8)
    crc ^= np.uint32(0xFFFFFFFF)
    masked = ((crc >> 15) | (crc << 17)).astype(np.uint64) + 0xA282EAD8
    return (masked & 0xFFFFFFFF).astype(np.uint32)


def frame_rows(rows: np.ndarray) -> np.ndarray:
    """TFRecord-frame N equal-length serialised events: uint8 [N, 16 + n]."""
    n_rows, n = rows.shape
    header = struct.pack("<Q", n)
    head = np.frombuffer(header + struct.pack("<I", masked_crc32c(header)), dtype=np.uint8)
    out = np.empty((n_rows, 16 + n), dtype=np.uint8)
    out[:, :12] = head
    out[:, 12 : 12 + n] = rows
    out[:, 12 + n :] = masked_crc32c_rows(rows).astype("<u4").view(np.uint8).reshape(n_rows, 4)
    return out


def frame_records(records: Sequence[bytes]) -> bytes:
    """Frame serialised events (any lengths), keeping their order."""
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_len.setdefault(len(r), []).append(i)
    framed: list[bytes] = [b""] * len(records)
    for n, idx in by_len.items():
        rows = np.frombuffer(b"".join(records[i] for i in idx), dtype=np.uint8).reshape(len(idx), n)
        out = frame_rows(rows)
        for k, i in enumerate(idx):
            framed[i] = out[k].tobytes()
    return b"".join(framed)


def _file_version_record(wall_time: float) -> bytes:
    ev = event_pb2.Event(wall_time=wall_time, file_version="brain.Event:2")
    return ev.SerializeToString()


def event_path(run_dir: str) -> str:
    os.makedirs(run_dir, exist_ok=True)
    return os.path.join(run_dir, f"events.out.tfevents.{int(time.time())}.bench.{os.getpid()}.0")


# ------------------------------------------------------------- the data
def layer_names(num_layers: int) -> list[str]:
    """Parameter names in model order, as a ResNet's ("blocks.12.conv1.weight", "blocks.12.bn1.bias")."""
    kinds = ("conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias")
    return [f"blocks.{i // len(kinds)}.{kinds[i % len(kinds)]}" for i in range(num_layers)]


def metric_values(metric: str, steps: np.ndarray, num_layers: int) -> np.ndarray:
    """Deterministic, plausible float32 values [S, L] (log-normal, a slow drift, rare spikes and NaNs)."""
    seed = sum(metric.encode()) * 7919 + num_layers
    rng = np.random.default_rng(seed)
    base = rng.normal(-3.0, 1.0, num_layers).astype(np.float32)
    drift = (-np.log1p(steps.astype(np.float32) / 2000.0))[:, None]
    noise = rng.standard_normal((steps.size, num_layers), dtype=np.float32) * 0.2
    v = np.exp(base[None, :] + drift + noise).astype(np.float32)
    if metric == "grad_norm":
        v[rng.random(v.shape) < 1e-4] *= 1000.0  # spikes
        v[rng.random(v.shape) < 1e-5] = np.nan
    if metric == "dead_fraction":
        v = np.clip(v * 5.0, 0.0, 1.0)
    if metric == "grad_nonfinite":
        v = np.zeros_like(v)
    return v


def _event(summary: summary_pb2.Summary, step: int) -> bytes:
    # A synthetic run needs increasing wall times, one tenth of a second per step.
    return event_pb2.Event(summary=summary, step=step, wall_time=1.7e9 + step * 0.1).SerializeToString()


def write_diagnostics_run(run_dir: str, num_steps: int, num_layers: int, chunk: int = 2000) -> int:
    """A run as the logger writes it for a model with `num_layers` parameter tensors.

    Per logged step, one event: grad_norm, grad_max_abs, grad_nonfinite,
    weight_norm, update_ratio over the parameters; dead_fraction, act_mean,
    act_std over num_layers // 4 ReLU sites; grad_norm_total, learning_rate,
    loss (total, ce, l2); plus the structure summary once. Returns bytes written.
    """
    layers = layer_names(num_layers)
    sites = [f"blocks.{i:03d}.relu__" for i in range(max(1, num_layers // 4))]
    encoder = VectorEncoder()
    records = []
    modules = [{"name": "", "type": "Net", "params": [], "num_params": num_layers * 100, "sites": []}]
    modules += [
        {"name": n.rsplit(".", 1)[0], "type": "Conv2d",
         "params": [{"name": n, "shape": [10, 10], "numel": 100, "tracked": True}],
         "num_params": 100, "sites": []}
        for n in layers
    ]
    records.append(_event(structure_summary({"version": metadata.STRUCTURE_VERSION, "modules": modules}), 0))
    param_metrics = PARAM_METRICS
    size = 0
    path = event_path(run_dir)
    t0 = 1.7e9
    with open(path, "wb") as f:
        f.write(frame_records([_file_version_record(t0)]))
        for lo in range(0, num_steps, chunk):
            steps = np.arange(lo, min(num_steps, lo + chunk), dtype=np.int64)
            pv = {m: metric_values(m, steps, num_layers) for m in param_metrics}
            av = {m: metric_values(m, steps, len(sites)) for m in ("dead_fraction", "act_mean", "act_std")}
            lv = metric_values("loss", steps, 3)
            for i, s in enumerate(steps):
                items = [(m, layers, (), pv[m][i]) for m in param_metrics]
                items += [(m, sites, ["ReLU"] * len(sites), av[m][i]) for m in av]
                items += [
                    ("grad_norm_total", [""], (), np.array([np.sqrt(np.nansum(pv["grad_norm"][i] ** 2))])),
                    ("learning_rate", [""], (), np.array([0.1])),
                    ("loss", [metadata.TOTAL_LOSS, "ce", "l2"], (), lv[i]),
                ]
                records.append(_event(encoder.encode(items), int(s)))
            data = frame_records(records)
            records.clear()
            f.write(data)
            size += len(data)
    return size


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
    """What `SummaryWriter.add_scalar(tag, value, step, walltime)` puts in a record (reference)."""
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
    return event_pb2.Event(summary=summary, step=step, wall_time=wall_time).SerializeToString()


def _scalar_rows(tags: list[bytes], values: np.ndarray, steps: np.ndarray, wall: np.ndarray) -> np.ndarray:
    """Vectorised `scalar_event` for steps x tags, all steps of one varint length and
    all tags of one length; uint8 [S, L, n]."""
    S, L = values.shape
    T = len(tags[0])
    assert all(len(t) == T for t in tags) and T + 7 < 128
    vlen = _varint(int(steps[0]))
    step_len = 0 if int(steps[0]) == 0 else len(vlen)
    value_len = 2 + T + 5
    summary_len = 2 + value_len
    n = 9 + (1 + step_len if step_len else 0) + 2 + summary_len
    rows = np.empty((S, L, n), dtype=np.uint8)
    o = 0
    rows[:, :, o] = 0x09
    rows[:, :, o + 1 : o + 9] = np.ascontiguousarray(wall, dtype="<f8").view(np.uint8).reshape(S, 1, 8)
    o += 9
    if step_len:
        rows[:, :, o] = 0x10
        st = steps.astype(np.uint64)
        for k in range(step_len):
            byte = (st >> np.uint64(7 * k)) & np.uint64(0x7F)
            if k < step_len - 1:
                byte |= np.uint64(0x80)
            rows[:, :, o + 1 + k] = byte.astype(np.uint8)[:, None]
        o += 1 + step_len
    rows[:, :, o : o + 4] = np.array([0x2A, summary_len, 0x0A, value_len], dtype=np.uint8)
    o += 4
    rows[:, :, o : o + 2] = np.array([0x0A, T], dtype=np.uint8)
    rows[:, :, o + 2 : o + 2 + T] = np.frombuffer(b"".join(tags), dtype=np.uint8).reshape(1, L, T)
    o += 2 + T
    rows[:, :, o] = 0x15
    rows[:, :, o + 1 : o + 5] = np.ascontiguousarray(values, dtype="<f4").view(np.uint8).reshape(S, L, 4)
    return rows


def write_scalar_run(run_dir: str, num_steps: int, num_layers: int, metric: str = "grad_norm",
                     chunk: int = 1000) -> int:
    """The baseline: `add_scalar(f"{metric}/{layer}", v, step)` for every layer and step."""
    layers = layer_names(num_layers)
    tags = [f"{metric}/{n}".encode() for n in layers]
    by_len: dict[int, list[int]] = {}
    for j, t in enumerate(tags):
        by_len.setdefault(len(t), []).append(j)
    groups = [np.array(idx) for idx in by_len.values()]
    path = event_path(run_dir)
    t0 = 1.7e9
    size = 0
    with open(path, "wb") as f:
        f.write(frame_records([_file_version_record(t0)]))
        for lo in range(0, num_steps, chunk):
            steps = np.arange(lo, min(num_steps, lo + chunk), dtype=np.int64)
            values = metric_values(metric, steps, num_layers)
            # Split where the step's varint length changes (0, 1..127, 128..16383, ...).
            vlen = np.array([0 if s == 0 else len(_varint(int(s))) for s in steps])
            for klass in np.unique(vlen):
                sel = vlen == klass
                S = int(sel.sum())
                per_group = []
                for g in groups:  # one framed block per tag length, then step-major again
                    rows = _scalar_rows([tags[j] for j in g], values[sel][:, g], steps[sel], t0 + steps[sel] * 0.1)
                    n = rows.shape[2]
                    per_group.append(frame_rows(rows.reshape(-1, n)).reshape(S, -1))
                # Within a step the layers come grouped by tag length: the order of
                # tags inside a step does not change what the loaders do.
                data = np.hstack(per_group).tobytes()
                f.write(data)
                size += len(data)
    return size


def self_check() -> None:
    """The vectorised encoders agree with protobuf and TensorBoard's CRC."""
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (5, 37), dtype=np.uint8)
    assert [int(c) for c in masked_crc32c_rows(rows)] == [masked_crc32c(r.tobytes()) for r in rows]
    tags = [b"grad_norm/blocks.0.conv1.weight", b"grad_norm/blocks.0.conv2.weight"]
    for step in (0, 5, 200, 20_000):
        vals = rng.standard_normal((1, 3)).astype(np.float32)
        got = _scalar_rows(tags[:2], vals[:, :2], np.array([step]), np.array([1.7e9 + step]))
        for j in range(2):
            want = scalar_event(tags[j].decode(), float(vals[0, j]), step, 1.7e9 + step)
            assert got[0, j].tobytes() == want, (step, j)


def ensure(root: str, kind: str, num_steps: int, num_layers: int,
           log: Callable[[str], None] = print) -> tuple[str, int]:
    """A cached logdir holding one run; returns (logdir, event bytes)."""
    logdir = os.path.join(root, f"{kind}-{num_steps}x{num_layers}")
    run_dir = os.path.join(logdir, "run")
    done = os.path.join(logdir, "DONE")
    if os.path.exists(done):
        with open(done) as f:
            return logdir, int(f.read())
    if os.path.exists(run_dir):
        for name in os.listdir(run_dir):
            os.remove(os.path.join(run_dir, name))
    t = time.perf_counter()
    if kind == "diag":
        size = write_diagnostics_run(run_dir, num_steps, num_layers)
    else:
        size = write_scalar_run(run_dir, num_steps, num_layers)
    log(f"  wrote {kind} {num_steps}x{num_layers}: {size / 1e6:.1f} MB in {time.perf_counter() - t:.1f} s")
    with open(done, "w") as f:
        f.write(str(size))
    return logdir, size
