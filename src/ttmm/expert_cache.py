"""The LRU of experts' laid-out factors a merger reads, bounded in bytes (issue 21).

A bank of 10,000 experts does not fit in memory (9.8 MB an expert for SmolLM2-135M at r = 8,
float32), and a merge needs only its few. :class:`ExpertCache` holds the experts merges have
used, up to ``budget_bytes``; a miss reads that expert alone from disk (its PEFT safetensors
file) and evicts the least recently used experts beyond the budget. Experts can be pinned (kept
whatever their use) and prefetched (read ahead, e.g. while a server's batch window is open).
With no budget every expert stays once read; the merger then reads them all when it is built,
as an engine holding everything in memory does.

Sizes are known before a read (:attr:`ExpertCache.sizes`, from the bank's layer ranks), so a
merge that cannot fit is refused before anything is read, with the smallest budget that would
hold it. The cache is thread-safe; a read runs outside its lock, so a prefetch does not hold up
a merge of cached experts, and two threads needing one expert read it once. A merge that misses
several experts reads them in parallel (``readers`` threads): reading a file, checking its hash
and laying it out release the GIL, so a cold merge costs about its slowest reads, not their sum.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

from ttmm.factors import ExpertFactors, MergeError

MB = 1 << 20


class CacheBudgetError(MergeError):
    """Experts that must be held at once do not fit the adapter cache's budget."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    read_seconds: float = 0.0
    """Seconds spent reading and laying out missed experts."""
    peak_bytes: int = 0
    """The most bytes the cache held at once."""


class ExpertCache:
    """Expert id → :class:`ExpertFactors`, least recently used evicted beyond ``budget_bytes``.

    ``read(k)`` reads and lays out expert k; ``sizes[k]`` is its size in bytes once laid out
    (exact for the experts the merger lays out; see :meth:`ttmm.merge.ExpertMerger.expert_bytes`).
    ``budget_bytes=None`` keeps every expert read. ``readers``: threads that read a merge's
    missing experts in parallel (1: one after another).
    """

    def __init__(
        self,
        read: Callable[[int], ExpertFactors],
        sizes: Sequence[int],
        budget_bytes: int | None = None,
        readers: int = min(4, os.cpu_count() or 1),
    ):
        if budget_bytes is not None and budget_bytes < 0:
            raise CacheBudgetError(f"the adapter cache budget must be >= 0, got {budget_bytes}")
        if readers < 1:
            raise ValueError(f"readers must be >= 1, got {readers}")
        self._read = read
        self.readers = readers
        self._pool: ThreadPoolExecutor | None = None
        self.sizes = list(sizes)
        self.budget_bytes = budget_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[int, ExpertFactors] = OrderedDict()
        self._bytes = 0
        self._pinned: set[int] = set()
        self._in_use: dict[int, int] = {}  # expert → gets holding it while they read others
        self._reading: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    # -- what it holds -------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of the experts held now."""
        return self._bytes

    def __contains__(self, expert_id: int) -> bool:
        return expert_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def pinned(self) -> frozenset[int]:
        return frozenset(self._pinned)

    def smallest_budget(self, ids: Iterable[int]) -> int:
        """Bytes needed to hold ``ids`` together with the pinned experts."""
        return sum(self.sizes[k] for k in set(ids) | self._pinned)

    def check_fits(self, ids: Iterable[int], what: str = "this merge") -> None:
        """Raise :class:`CacheBudgetError` if ``ids`` and the pinned experts exceed the budget."""
        ids = set(ids)
        needed = self.smallest_budget(ids)
        if self.budget_bytes is not None and needed > self.budget_bytes:
            pinned = f" and {len(self._pinned)} pinned" if self._pinned else ""
            raise CacheBudgetError(
                f"{what} needs {len(ids)} expert(s){pinned} held at once, "
                f"{needed / MB:.1f} MB, but the adapter cache holds "
                f"{self.budget_bytes / MB:.1f} MB; give --adapter-cache-mb "
                f"{_mb_ceil(needed)} or more (adapter_cache_mb in Python)"
            )

    def chunks(self, ids: Sequence[int]) -> list[list[int]]:
        """``ids`` cut, in order, into runs that each fit the budget beside the pinned experts
        (one run without a budget): what a batch whose experts do not fit at once reads one
        run after another."""
        if self.budget_bytes is None:
            return [list(ids)]
        room = self.budget_bytes - self.smallest_budget([])
        runs: list[list[int]] = [[]]
        used = 0
        for k in ids:
            size = 0 if k in self._pinned else self.sizes[k]
            if runs[-1] and used + size > room:
                runs.append([])
                used = 0
            runs[-1].append(k)
            used += size
        return runs

    # -- getting experts -----------------------------------------------------------------

    def get(self, ids: Sequence[int]) -> list[ExpertFactors]:
        """The laid-out factors of ``ids`` (in that order), reading the missing ones."""
        ids = list(ids)
        self.check_fits(ids)
        unique = list(dict.fromkeys(ids))
        with self._lock:
            for k in unique:
                self._in_use[k] = self._in_use.get(k, 0) + 1
        try:
            found = self._get_all(unique)
        finally:
            with self._lock:
                for k in unique:
                    self._in_use[k] -= 1
                    if not self._in_use[k]:
                        del self._in_use[k]
                self._evict()
        return [found[k] for k in ids]

    def _get_all(self, unique: list[int]) -> dict[int, ExpertFactors]:
        """``_get_one(k, keep=True)`` for each of ``unique``, the misses read in parallel."""
        with self._lock:
            missing = [k for k in unique if k not in self._entries]
        if self.readers == 1 or len(missing) < 2:
            return {k: self._get_one(k, keep=True) for k in unique}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.readers, thread_name_prefix="ttmm-expert-read")
        reads = {k: self._pool.submit(self._get_one, k, True) for k in missing}
        wait(reads.values())  # all of them, even when one fails, before the caller goes on
        found = {
            k: reads[k].result() if k in reads else self._get_one(k, keep=True) for k in unique
        }
        with self._lock:  # recency in the order asked, as reads one after another give
            for k in unique:
                if k in self._entries:
                    self._entries.move_to_end(k)
        return found

    def prefetch(self, ids: Iterable[int]) -> None:
        """Read ``ids`` ahead of their merge, as far as the budget allows without evicting an
        expert in use or pinned."""
        for k in dict.fromkeys(ids):
            self._get_one(k, keep=False)

    def pin(self, ids: Iterable[int]) -> None:
        """Keep ``ids`` held whatever their use (read now); they count against the budget."""
        ids = set(ids)
        self.check_fits(ids, "pinning")
        with self._lock:
            self._pinned |= ids
        self.get(sorted(ids))

    def unpin(self, ids: Iterable[int]) -> None:
        with self._lock:
            self._pinned -= set(ids)
            self._evict()

    def clear(self) -> None:
        """Drop every expert that is not pinned."""
        with self._lock:
            for k in [k for k in self._entries if k not in self._pinned]:
                self._bytes -= self._entries.pop(k).nbytes

    def _get_one(self, k: int, keep: bool) -> ExpertFactors:
        while True:
            with self._lock:
                entry = self._entries.get(k)
                if entry is not None:
                    self._entries.move_to_end(k)
                    if keep:
                        self.stats.hits += 1
                    return entry
                reading = self._reading.get(k)
                if reading is None:
                    self._reading[k] = threading.Event()
                    if keep:
                        self.stats.misses += 1
                    break
            reading.wait()  # another thread reads it: take its result (or read it again)
        try:
            start = time.perf_counter()
            entry = self._read(k)
            seconds = time.perf_counter() - start
            with self._lock:
                self.stats.read_seconds += seconds
                self.sizes[k] = entry.nbytes
                self._entries[k] = entry
                self._bytes += entry.nbytes
                # make room at once, so the cache never holds more than its budget (a get's
                # other experts are in use: check_fits made sure they fit together)
                if not self._evict(spare={k}) and not keep:
                    self._bytes -= self._entries.pop(k).nbytes  # a prefetch that does not fit
                self.stats.peak_bytes = max(self.stats.peak_bytes, self._bytes)
        finally:
            with self._lock:
                self._reading.pop(k).set()
        return entry

    def _evict(self, spare: frozenset[int] | set[int] = frozenset()) -> bool:
        """Evict least recently used experts (not pinned, in use or in ``spare``) until the
        cache is within its budget; False if it cannot get there. Call with the lock held."""
        if self.budget_bytes is None:
            return True
        for k in list(self._entries):
            if self._bytes <= self.budget_bytes:
                break
            if k in self._pinned or k in self._in_use or k in spare:
                continue
            self._bytes -= self._entries.pop(k).nbytes
            self.stats.evictions += 1
        return self._bytes <= self.budget_bytes


def _mb_ceil(nbytes: int) -> int:
    return -(-nbytes // MB)
