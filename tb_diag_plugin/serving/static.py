"""The tab's own files (package data) and plotly.js (from the `plotly` package, loaded on first use)."""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import mimetypes
import re
import threading
from typing import Optional

from tensorboard import errors

_STATIC_NAME = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*\.(js|css|svg|png)$")


class StaticFiles:
    """Files of `tb_diag_plugin.frontend_static` by relative name; nothing outside it."""

    def __init__(self) -> None:
        self._root = importlib.resources.files("tb_diag_plugin.frontend_static")

    def read(self, name: str) -> Optional[bytes]:
        """The file's bytes, or None for a name that is not one of the tab's files."""
        if not _STATIC_NAME.match(name) or ".." in name:
            return None
        node = self._root
        for part in name.split("/"):
            node = node.joinpath(part)
        try:
            return node.read_bytes() if node.is_file() else None
        except OSError:
            return None

    def get(self, name: str) -> tuple[bytes, str]:
        """(body, content type) of `name`; NotFoundError when there is no such file."""
        body = self.read(name)
        if body is None:
            raise errors.NotFoundError(f"no static file {name[:200]!r}")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if name.endswith(".js"):
            ctype = "application/javascript"
        return body, ctype


_plotly_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _plotly_gz_cached() -> bytes:
    from plotly.offline import get_plotlyjs

    return gzip.compress(get_plotlyjs().encode("utf-8"), compresslevel=6, mtime=0)


def plotly_gz() -> bytes:
    """plotly.js from the `plotly` package, gzipped once per process."""
    with _plotly_lock:
        return _plotly_gz_cached()
