"""Members' tensors kept in memory up to a byte budget, least recently used first out.

A DE offspring reads three or four members, drawn anew for each candidate;
without a cache every merge reads them again from their files. This cache
sits under population/store.FileLoader, so mergekit's planner and executor
read through it unchanged and every result keeps its bits (a member dir is
never rewritten: a kept offspring gets a new dir).

Its unit is the member: one is admitted only when its whole size fits beside
the members that stay, so the resident set never passes the budget, whatever
the population's size. The members of the recipe being merged are pinned:
a merge reads them tensor by tensor, interleaved, and evicting one of them to
admit another would throw away every tensor read so far, tensor after tensor.
A member that does not fit is read from its files, as without a cache.

`prefetch` reads the members the next candidate will use on a thread while
this one is scored (the thread mostly waits on the disk or copies pages, so
it takes little from the forward passes); the next merge stops it first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable, Optional, Protocol

import torch


class Member(Protocol):
    """What the cache needs of a member's loader (store.FileLoader)."""

    key: str  # the member's dir
    nbytes: int  # all its tensors' bytes

    def names(self) -> list[str]: ...

    def read(self, name: str) -> torch.Tensor: ...


class PopulationCache:
    def __init__(self, budget: int = 0, device: str = "cpu"):
        self.budget = budget
        self.device = device
        self._tensors: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._pinned: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._prefetch: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self.hits = 0
        self.misses = 0

    def configure(self, budget: int, device: str = "cpu") -> None:
        """A run's settings; what was held under others is let go."""
        self.stop_prefetch()
        with self._lock:
            self.budget, self.device = int(budget), device
            self._tensors.clear()
            self._sizes.clear()
            self._pinned = frozenset()
            self.hits = self.misses = 0

    @property
    def held(self) -> int:
        """Bytes reserved by the admitted members."""
        return sum(self._sizes.values())

    def members(self) -> list[str]:
        """The admitted members, least recently used first."""
        with self._lock:
            return list(self._tensors)

    def pin(self, keys: Iterable[str]) -> None:
        """The members of the recipe about to be merged: never evicted for
        another until the next pin. It stops a prefetch (the merge reads the
        same files)."""
        self.stop_prefetch()
        with self._lock:
            self._pinned = frozenset(keys)

    def forget(self, key: str) -> None:
        """A member that left the population."""
        with self._lock:
            self._tensors.pop(key, None)
            self._sizes.pop(key, None)

    def tensor(self, member: Member, name: str) -> torch.Tensor:
        """The member's tensor: from memory when held, else read (and held
        when the member is admitted)."""
        if self.budget <= 0:
            return member.read(name)
        with self._lock:
            held = self._admitted(member)
            if held is not None:
                self._tensors.move_to_end(member.key)
                tensor = held.get(name)
                if tensor is not None:
                    self.hits += 1
                    return tensor
            self.misses += 1
        tensor = member.read(name)
        if held is None:
            return tensor
        tensor = tensor.to(self.device)
        with self._lock:
            # It may have been evicted while the bytes were read.
            if self._tensors.get(member.key) is held:
                tensor = held.setdefault(name, tensor)
        return tensor

    def _admitted(self, member: Member) -> Optional[dict[str, torch.Tensor]]:
        """The member's held tensors, admitting it if it fits (the lock is held)."""
        held = self._tensors.get(member.key)
        if held is not None:
            return held
        if member.nbytes > self.budget:
            return None
        free = self.budget - self.held
        evictable = [k for k in self._tensors if k not in self._pinned and k != member.key]
        if free + sum(self._sizes[k] for k in evictable) < member.nbytes:
            return None
        for key in evictable:
            if free >= member.nbytes:
                break
            free += self._sizes.pop(key)
            del self._tensors[key]
        held = self._tensors[member.key] = {}
        self._sizes[member.key] = member.nbytes
        return held

    # -- prefetch ------------------------------------------------------------------
    def prefetch(self, members: Iterable[Member]) -> None:
        """Read these members into the cache on a thread, pinned as the next
        merge will pin them."""
        members = list(members)
        if self.budget <= 0 or not members:
            return
        self.pin(m.key for m in members)
        self._stop.clear()
        self._prefetch = threading.Thread(target=self._fill, args=(members,), daemon=True, name="prefetch")
        self._prefetch.start()

    def _fill(self, members: list[Member]) -> None:
        for member in members:
            for name in member.names():
                if self._stop.is_set():
                    return
                self.tensor(member, name)

    def stop_prefetch(self) -> None:
        thread, self._prefetch = self._prefetch, None
        if thread is not None:
            self._stop.set()
            thread.join()


# One per process, as mergekit's LoaderCache is: the loaders it serves are
# built wherever mergekit asks for a model. A budget of 0 (the default, and in
# every process a run did not configure) reads straight from the files.
POPULATION_CACHE = PopulationCache()


def auto_budget(device: str = "cpu", share: float = 0.25) -> int:
    """The default budget: a quarter of the memory free when the run starts,
    on the device the cache lives on."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * share)
    return int(_mem_available() * share)


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

