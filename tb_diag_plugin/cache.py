"""A least-recently-used cache bounded by bytes, that computes each key once.

Reading one metric of a 20,000-step x 500-layer run from TensorBoard's data
provider takes about half a second here; a tour of the tab touches about ten
metrics, and several requests (a view's, the read-ahead's) may want the same
one at once. Concurrent callers of `get` for the same key wait for a single
computation instead of repeating it.

The plugin keeps one budget for everything it caches: the store's caches are
`parts` of one `ByteLRU`, so that merged series, binned columns, encoded
answers and findings compete for the same bytes. An entry's size is the
memory its arrays keep alive (`nbytes`), a view counted as the buffer it holds.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional

import numpy as np


def nbytes(obj: Any) -> int:
    """Memory kept alive by `obj` (arrays, bytes and str inside tuples, lists, dicts, objects): each
    array counted as the buffer it holds (a view as its base, once however many views share it, a
    broadcast as its one element), plus 64 bytes per container."""
    return _held(obj, set())


def _held(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, np.ndarray):
        root = _owner(obj)
        if root is None:
            return obj.itemsize
        if id(root) in seen:
            return 0
        seen.add(id(root))
        if isinstance(root, np.ndarray):
            return root.nbytes
        return len(root) if isinstance(root, (bytes, bytearray)) else memoryview(root).nbytes
    if isinstance(obj, (bytes, bytearray, str)):
        return len(obj)
    if isinstance(obj, (tuple, list)):
        return 64 + sum(_held(x, seen) for x in obj)
    if isinstance(obj, dict):
        return 64 + sum(_held(k, seen) + _held(v, seen) for k, v in obj.items())
    if hasattr(obj, "__dict__"):
        return 64 + sum(_held(v, seen) for v in vars(obj).values())
    slots = getattr(type(obj), "__slots__", ())
    if slots:  # a slotted object (layer_groups.Group): what its slots hold
        return 64 + sum(_held(getattr(obj, name, None), seen) for name in slots if name != "__weakref__")
    return 64


def _owner(arr: np.ndarray) -> Any:
    """What holds an array's memory: the array that owns it, or the bytes an array was made from;
    None for a broadcast (a zero stride: one element of its base, counted as one item)."""
    while True:
        if 0 in arr.strides and arr.size > 1:
            return None
        if not isinstance(arr.base, np.ndarray):
            break
        arr = arr.base
    return arr if arr.base is None else arr.base


_MISS = object()  # what `_lookup` returns for a key not cached (a cached value may be None)


class _Pending:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class ByteLRU:
    """Keeps entries until their total size passes `max_bytes`, dropping the least recently used.

    `part(name)` gives a view of this cache under its own key space that shares the one budget.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._pending: dict[Hashable, _Pending] = {}
        self._size = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        return self._size

    def peek(self, key: Hashable) -> Any:
        """The cached value or None, without computing it."""
        with self._lock:
            value, _ = self._lookup(key)
        return None if value is _MISS else value

    def wait(self, key: Hashable) -> Any:
        """The cached value, or the value being computed for `key` once it is ready; None when it is
        neither cached nor being computed (or its computation failed). Computes nothing."""
        with self._lock:
            value, pending = self._lookup(key)
        if value is not _MISS:
            return value
        if pending is None:
            return None
        pending.done.wait()
        return None if pending.error is not None else pending.value

    def get(self, key: Hashable, compute: Callable[[], Any], max_entry: Optional[int] = None) -> Any:
        """The value for `key`, computed by `compute()` once even when asked for concurrently; kept only
        if it holds at most `max_entry` bytes (and the budget's)."""
        with self._lock:
            value, pending = self._lookup(key)
            if value is not _MISS:
                return value
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Pending()
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return pending.value
        try:
            pending.value = compute()
        except BaseException as e:
            pending.error = e
            raise
        finally:
            with self._lock:
                del self._pending[key]
                if pending.error is None:
                    self._put(key, pending.value, max_entry)
            pending.done.set()
        return pending.value

    def part(self, name: str, max_entry: Optional[int] = None) -> CachePart:
        """A cache with keys of its own that shares this one's budget and eviction order, and keeps no
        entry bigger than `max_entry` bytes."""
        return CachePart(self, name, max_entry)

    def entries(self) -> list[tuple[Hashable, Any]]:
        """(key, value) of every entry, least recently used first (for tests and accounting)."""
        with self._lock:
            return [(k, v) for k, (v, _) in self._entries.items()]

    def drop(self, keep: Callable[[Hashable], bool]) -> None:
        """Forget every entry whose key `keep` rejects."""
        with self._lock:
            for key in [k for k in self._entries if not keep(k)]:
                self._size -= self._entries.pop(key)[1]

    def _lookup(self, key: Hashable) -> tuple[Any, Optional[_Pending]]:
        """With the lock held: (the cached value, marked most recently used, None), or on a miss
        (`_MISS`, the computation pending for `key` or None)."""
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit[0], None
        return _MISS, self._pending.get(key)

    def _put(self, key: Hashable, value: Any, max_entry: Optional[int] = None) -> None:
        size = nbytes(value)
        if size > self.max_bytes or (max_entry is not None and size > max_entry):
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._size -= old[1]
        self._entries[key] = (value, size)
        self._size += size
        while self._size > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._size -= dropped


class CachePart:
    """One of the store's caches: a `ByteLRU`'s `get`/`peek` under keys prefixed by the part's name."""

    def __init__(self, lru: ByteLRU, name: str, max_entry: Optional[int] = None) -> None:
        self.lru = lru
        self.name = name
        self.max_entry = max_entry

    def get(self, key: Hashable, compute: Callable[[], Any], max_entry: Optional[int] = None) -> Any:
        """The value for `key`, computed once (see `ByteLRU.get`); kept if it holds at most `max_entry`
        bytes (default: the part's)."""
        return self.lru.get((self.name, key), compute, self.max_entry if max_entry is None else max_entry)

    def peek(self, key: Hashable) -> Any:
        """The cached value or None, without computing it."""
        return self.lru.peek((self.name, key))

    def wait(self, key: Hashable) -> Any:
        """The cached value, or the one being computed once it is ready, or None (see `ByteLRU.wait`)."""
        return self.lru.wait((self.name, key))

    def keys(self) -> list[Hashable]:
        """This part's keys, least recently used first."""
        return [k[1] for k, _ in self.lru.entries() if isinstance(k, tuple) and k[:1] == (self.name,)]

    @property
    def size(self) -> int:
        """Bytes this part's entries hold (the budget is the whole cache's)."""
        with self.lru._lock:
            return sum(size for k, (_, size) in self.lru._entries.items()
                       if isinstance(k, tuple) and k[:1] == (self.name,))

    def clear(self) -> None:
        """Forget this part's entries."""
        self.lru.drop(lambda k: not (isinstance(k, tuple) and k[:1] == (self.name,)))

    def __len__(self) -> int:
        return len(self.keys())
