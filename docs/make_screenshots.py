"""Regenerate docs/screenshots/ (the README's pictures), on purpose: `python docs/make_screenshots.py`.

The browser tests take these pictures as they check each view; run alone, they
write to tests/artifacts/ (git-ignored), so that the test suite never changes
tracked files. This runs the same tests with their screenshots pointed here.
Needs Chromium (see tests/conftest.py) and the test extra installed.
"""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = ["tests/test_browser.py", "tests/test_hostile_data.py::test_tab_shows_what_cannot_be_shown"]


def main() -> int:
    """Run the browser tests with TB_DIAG_SCREENSHOTS=docs/screenshots; returns pytest's exit status."""
    env = dict(os.environ, TB_DIAG_SCREENSHOTS=os.path.join(HERE, "screenshots"))
    return subprocess.call([sys.executable, "-m", "pytest", "-q", *TESTS], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
