"""Shared fixtures: demo logdir, real TensorBoard servers, headless Chromium."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tbserver import serve  # noqa: E402

CHROMIUM = os.environ.get("TB_DIAG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Screenshots go to a git-ignored folder; docs/make_screenshots.py points this at docs/screenshots on purpose.
ARTIFACTS = os.environ.get("TB_DIAG_SCREENSHOTS") or os.path.join(os.path.dirname(__file__), "artifacts")


@pytest.fixture(scope="session")
def demo_logdir(tmp_path_factory):
    """The demo's four runs (fewer steps than `tb-diag demo`, same models)."""
    from tb_diag_logger import demo

    d = tmp_path_factory.mktemp("demo")
    demo.write_demo(str(d), steps=240, every=2, quiet=True)
    return d


@pytest.fixture(scope="session")
def demo_server(demo_logdir):
    with serve(str(demo_logdir)) as srv:
        srv.wait_for_runs(4)
        yield srv


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright (Playwright's own download does not work here)."""
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install -y --no-install-recommends chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()
