"""Resident memory of a real `tensorboard` serving a big run, and each view's first answer (issue 24.4).

Starts the `tensorboard` command (Rust data server, the default loader) on a
logdir, waits until the run is loaded (every step of its loss), its
findings are complete and TensorBoard's background work is done (its CPU time
still for 5 s: the preload has built each metric's step-binned summary), then
visits each view's routes as the tab asks for them (benchmarks/reading.py
`_views`), timing the first answer and reading
VmRSS and VmHWM from /proc for TensorBoard and for its data server after each.

    python benchmarks/memory.py --logdir /work/data/big20k [--cache-mb 64] [--out FILE]

The run is any logdir with one run named `run` (benchmarks/eventgen.py writes one).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]

import reading  # noqa: E402  (benchmarks/reading.py: the views' requests)

import tbserver  # noqa: E402  (tests/tbserver.py: the HTTP client the tests and the other benchmarks use)


def _status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024.0
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(p))
            except OSError:
                pass
    return kids


def memory(pid: int) -> dict[str, float]:
    """TensorBoard's VmRSS/VmHWM and its data server's (the sum of its child processes'), in MiB."""
    tb = _status(pid)
    kids = [_status(k) for k in _children(pid)]
    return {"tb_rss": tb["VmRSS"], "tb_hwm": tb["VmHWM"],
            "server_rss": sum(k["VmRSS"] for k in kids), "server_hwm": sum(k["VmHWM"] for k in kids)}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _until_idle(pid: int, window_s: float = 5.0, busy_s: float = 0.25) -> None:
    """Until TensorBoard uses less than `busy_s` of CPU over `window_s` (its preload is done)."""
    while True:
        before = _cpu_s(pid)
        time.sleep(window_s)
        if _cpu_s(pid) - before < busy_s:
            return


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--logdir", required=True)
    ap.add_argument("--cache-mb", type=int, default=None, help="--diagnostics_cache_mb (default: the plugin's)")
    ap.add_argument("--load-fast", default="true", choices=("true", "false"))
    ap.add_argument("--json-reference", action="store_true",
                    help="also time the ungrouped grad_norm heatmap as JSON (minutes at 20,000 x 5,000)")
    ap.add_argument("--no-settle", action="store_true",
                    help="visit the views as soon as the findings are complete, not once TensorBoard is idle")
    ap.add_argument("--out", default=None, help="write the figures as JSON here too")
    args = ap.parse_args()

    port = _free_port()
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--port", str(port),
           "--host", "127.0.0.1", "--load_fast", args.load_fast]
    if args.cache_mb is not None:
        cmd += ["--diagnostics_cache_mb", str(args.cache_mb)]
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"tb-memory-{port}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    http = tbserver.Server(f"http://127.0.0.1:{port}/", timeout=600)
    rows = []
    try:
        t0 = time.perf_counter()
        d = "data/plugin/diagnostics/"
        last = None
        while True:  # TensorBoard up, the run listed, and its loss's last step the same over 5 s
            try:
                runs = http.json(d + "runs")["runs"]
                if runs:
                    tags = http.json(d + f"tags?run={reading.RUN}")
                    loss = http.json(d + f"values?run={reading.RUN}&metric=loss&points=1")
                    steps = loss["last_step"]
                    # One event holds every tag of a step: the loss complete is the run complete.
                    if steps is not None and steps == last and loss["num_steps"] == steps + 1:
                        break
                    last = steps
            except (OSError, RuntimeError):
                pass
            time.sleep(5.0)
        loaded = time.perf_counter() - t0
        rows.append(("loaded (the loss's last step unchanged for 5 s)", loaded * 1e3, 0, memory(proc.pid)))
        print(f"loaded in {loaded:.1f} s: {rows[-1][3]}", flush=True)
        t = time.perf_counter()
        while not http.json(d + f"findings?run={reading.RUN}&partial=true&wait_ms=5000")["complete"]:
            pass
        rows.append(("findings complete (preload or tab)", (time.perf_counter() - t) * 1e3, 0, memory(proc.pid)))
        print(f"findings after {rows[-1][1] / 1e3:.1f} s more: {rows[-1][3]}", flush=True)
        if not args.no_settle:
            t = time.perf_counter()
            _until_idle(proc.pid)
            rows.append(("background work done (TensorBoard idle for 5 s)", (time.perf_counter() - t) * 1e3, 0,
                         memory(proc.pid)))
            print(f"idle after {rows[-1][1] / 1e3:.1f} s more: {rows[-1][3]}", flush=True)
        layers = tags["metrics"]["grad_norm"]["layers"]
        for name, paths, _ in reading._views(layers, steps + 1):
            if "as JSON" in name and not args.json_reference:
                continue
            t = time.perf_counter()
            size = 0
            for p in paths:
                p = p.removeprefix(reading.POLL)
                status, body, _ = http.get(p, headers={"Accept-Encoding": "gzip"})
                if status != 200:
                    raise RuntimeError(f"{name}: {p}: {status} {body[:300]!r}")
                size += len(body)
            rows.append((name, (time.perf_counter() - t) * 1e3, size, memory(proc.pid)))
            m = rows[-1][3]
            print(f"{name}: {rows[-1][1]:.0f} ms, {size / 1e6:.2f} MB; TB {m['tb_rss']:.0f} MiB "
                  f"(peak {m['tb_hwm']:.0f}), data server {m['server_rss']:.0f} MiB", flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print("\n| step | first answer | bytes | TensorBoard VmRSS / VmHWM (MiB) | data server VmRSS / VmHWM (MiB) |")
    print("|---|---|---|---|---|")
    for name, ms, size, m in rows:
        print(f"| {name} | {ms:,.0f} ms | {size / 1e6:.2f} MB | {m['tb_rss']:,.0f} / {m['tb_hwm']:,.0f} | "
              f"{m['server_rss']:,.0f} / {m['server_hwm']:,.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cmd": cmd, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
