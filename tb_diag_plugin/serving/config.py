"""The plugin's settings: one frozen object built from TensorBoard's flags, passed to every part."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

# Samples kept per diagnostics tag when the user gives no
# --samples_per_plugin=diagnostics=N: TensorBoard's own default for custom
# plugins (10 or 100) would throw away almost all of a run's history.
DEFAULT_SAMPLES = 20_000
# Everything the plugin caches (series, binned columns, answers, findings) shares one budget, in MiB
# (--diagnostics_cache_mb); a metric larger than a quarter of it is read on demand, never kept.
DEFAULT_CACHE_MB = 1024


@dataclass(frozen=True)
class Config:
    """Sizes, intervals and budgets of the plugin's serving (every field has a working default)."""

    samples: int = DEFAULT_SAMPLES
    preload: bool = True  # read each loaded run before the tab asks (--diagnostics_preload)
    default_points: int = 1000
    max_points: int = 100_000
    max_layers_per_request: int = 100_000
    # The one budget of every cache of the plugin: merged series (one tour of the tab touches about ten
    # metrics of each selected run), binned columns of grouped views (opening a group regroups them without
    # binning again), encoded /values answers (a poll on unchanged data skips binning and encoding), findings.
    cache_bytes: int = DEFAULT_CACHE_MB << 20
    # A metric's merged series is kept only up to this share of the budget; a bigger one is read on demand
    # (only the steps and layers a request needs, binned while it is read), so that one metric cannot
    # push every other out.
    series_share: float = 0.25
    # How long one listing of the runs serves the requests that follow it (a view's requests arrive together).
    index_ttl_s: float = 1.0
    # A run is read ahead at most this often: a live run changes every few seconds.
    read_ahead_interval_s: float = 60.0
    # The longest background work waits for the requests in flight before it goes on.
    read_ahead_yield_s: float = 5.0
    # Seconds between two looks for runs to preload: short while some run changed at the last look.
    preload_poll_s: float = 5.0
    preload_settle_poll_s: float = 1.0
    # Runs are preloaded while the cached series hold less than this (None: half of `cache_bytes`).
    preload_bytes: Optional[int] = None
    # The preload gives up after this many failed looks in a row (a data server gone for good).
    preload_max_failures: int = 300
    # New event-file bytes beyond this are checked for damage in a background thread, not in the request.
    integrity_inline_bytes: int = 8 << 20
    # /findings?partial=true waits at most this long for the findings before it answers with what is ready,
    findings_wait_s: float = 0.1
    # and at most this long when the tab asks again with wait_ms (it holds one request while they compute).
    findings_max_wait_s: float = 5.0

    @property
    def preload_budget(self) -> int:
        """The preload's series budget in bytes."""
        return self.cache_bytes // 2 if self.preload_bytes is None else self.preload_bytes

    @property
    def max_series_bytes(self) -> int:
        """The largest merged series the cache keeps; a bigger one is read on demand."""
        return int(self.cache_bytes * self.series_share)

    @classmethod
    def from_flags(cls, flags: Any, base: Optional[Config] = None) -> Config:
        """`base` (or the defaults) with what TensorBoard's flags say."""
        base = base or cls()
        samples = getattr(flags, "diagnostics_samples", None)
        preload = getattr(flags, "diagnostics_preload", None)
        cache_mb = getattr(flags, "diagnostics_cache_mb", None)
        return dataclasses.replace(
            base,
            samples=base.samples if samples is None else samples,
            preload=base.preload if preload is None else preload != "false",
            cache_bytes=base.cache_bytes if cache_mb is None else int(cache_mb) << 20,
        )
