"""The plugin's byte-bounded cache: evicts by size, computes a key once under concurrency, never caches errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tb_diag_plugin.cache import ByteLRU, nbytes


def test_evicts_least_recently_used_by_bytes():
    c = ByteLRU(max_bytes=3000)
    for k in "abc":
        c.get(k, lambda: np.zeros(100, dtype=np.float64))  # 800 bytes (+ nothing else)
    c.get("a", lambda: pytest.fail("a is cached"))  # touch a: b is now the oldest
    c.get("d", lambda: np.zeros(100, dtype=np.float64))
    assert c.peek("b") is None and c.peek("a") is not None and c.size <= 3000


def test_value_bigger_than_the_cache_is_returned_not_kept():
    c = ByteLRU(max_bytes=100)
    assert c.get("x", lambda: np.zeros(1000)).size == 1000
    assert len(c) == 0


def test_broadcast_arrays_count_once():
    assert nbytes(np.broadcast_to(np.True_, (20000, 500))) == 1
    assert nbytes((np.zeros((10, 10), np.float32), [np.zeros(5, np.uint8)])) == 400 + 5 + 128


def test_concurrent_callers_share_one_computation():
    c = ByteLRU(1 << 20)
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return np.arange(3)

    out = []
    threads = [threading.Thread(target=lambda: out.append(c.get("k", slow))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 8 and all((o == [0, 1, 2]).all() for o in out)


def test_errors_reach_every_waiter_and_are_not_cached():
    c = ByteLRU(1 << 20)

    def boom():
        time.sleep(0.1)
        raise ValueError("bad data")

    errors = []

    def call():
        try:
            c.get("k", boom)
        except ValueError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == ["bad data"] * 4
    assert c.get("k", lambda: 7) == 7
