"""The built wheel: contents, and a TensorBoard in a clean venv serving the tab from it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    (whl,) = out.glob("tb_diag-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "tb_diag_plugin/frontend_static/index.js",
        "tb_diag_plugin/plugin_data.proto",
        "tb_diag_plugin/plugin_data_pb2.py",
        "tb_diag_plugin/http_api.md",
        "tb_diag_plugin/serving/store.py",
        "tb_diag_plugin/reading/provider.py",
        "tb_diag_logger/__init__.py",
        "tb_diag_logger/diagnostics.py",
    ):
        assert required in names, required
    static = {n for n in names if n.startswith("tb_diag_plugin/frontend_static/")}
    source = {
        "tb_diag_plugin/frontend_static/" + str(p.relative_to(ROOT / "frontend_static")).replace(os.sep, "/")
        for p in (ROOT / "frontend_static").rglob("*")
        if p.is_file() and p.suffix in (".js", ".css") and "__pycache__" not in p.parts
    }
    assert source <= static, f"frontend files missing from the wheel: {sorted(source - static)}"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "diagnostics = tb_diag_plugin.diagnostics_plugin:DiagnosticsLoader" in text
    assert "tb-diag = tb_diag_plugin.cli:main" in text


def test_wheel_serves_tab_from_clean_venv(wheel, tmp_path, demo_logdir):
    """TensorBoard discovers the plugin through the installed entry point and serves its files."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # The TensorBoard side needs no torch: install only what it imports.
    subprocess.run([str(py), "-m", "pip", "install", "-q", "tensorboard", "plotly", "numpy", "protobuf>=6.31.1,<8"],
                   check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    where = subprocess.run(
        [str(py), "-c", "import tb_diag_plugin, sys; print(tb_diag_plugin.__file__)"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    ).stdout
    assert str(venv) in where and str(ROOT) not in where

    proc = subprocess.Popen(
        [str(venv / "bin" / "tensorboard"), "--logdir", str(demo_logdir), "--port", "0", "--host", "127.0.0.1",
         "--load_fast", "false"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=tmp_path,
    )
    try:
        url = None
        deadline = time.monotonic() + 90
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            if m:
                url = m.group(1)
            elif not line and proc.poll() is not None:
                break
        assert url, "tensorboard did not start"
        import json

        for _ in range(120):
            with urllib.request.urlopen(url + "data/plugins_listing") as r:
                listing = json.loads(r.read())
            if listing.get("diagnostics", {}).get("enabled"):
                break
            time.sleep(0.5)
        assert listing["diagnostics"]["enabled"] is True
        with urllib.request.urlopen(url + "data/plugin/diagnostics/index.js") as r:
            assert b"export function render" in r.read()
        with urllib.request.urlopen(url + "data/plugin/diagnostics/runs") as r:
            runs = {x["run"] for x in json.loads(r.read())["runs"]}
        assert {"healthy", "vanishing_sigmoid", "dying_relu", "diverging"} <= runs
    finally:
        proc.terminate()
        proc.wait(timeout=30)
