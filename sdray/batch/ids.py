"""Unique ids at any scale: every row claims its id as it is read; the first claim wins.

A later row with an id already claimed is not generated: it is written as an error row naming
the row that keeps the id, with a null id of its own, so no two output rows ever share an id and
no barrier holds generation back. No process holds every id: claims go to registry actors by a
hash of the id, each keeping 16-byte digests and their owners in sorted numpy arrays (24 bytes
an id). A row's owner is its position in the input, so a retried task claims the same ids again
and still wins them. On resume, the ids committed earlier are claimed before any new row.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

COMMITTED = -1  # the owner of an id that an earlier run committed
FILE_SHIFT = 40  # an owner is (file index << FILE_SHIFT) | row in that file
KEY = np.dtype("S16")


def digests(ids: list[str]) -> np.ndarray:
    """16-byte digests of ids (collisions: about one in 10^20 for a billion ids)."""
    return np.array(
        [hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=16).digest() for i in ids],
        KEY,
    )


class ClaimStore:
    """Digest -> owner, as a few sorted runs merged as they grow (each lookup searches every run,
    of which there are at most log2 of the count)."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self.runs)

    def owners(self, keys: np.ndarray) -> np.ndarray:
        """The owner of each key, or -2 where none claimed it yet."""
        found = np.full(len(keys), -2, np.int64)
        for run_keys, run_owners in self.runs:
            where = np.minimum(np.searchsorted(run_keys, keys), len(run_keys) - 1)
            hit = run_keys[where] == keys
            found[hit] = run_owners[where[hit]]
        return found

    def claim(self, keys: np.ndarray, owners: np.ndarray) -> np.ndarray:
        """Give each unclaimed key to its smallest claimant here; return every key's owner."""
        new = self.owners(keys) == -2
        if new.any():
            order = np.lexsort((owners[new], keys[new]))
            sorted_keys, sorted_owners = keys[new][order], owners[new][order]
            first = np.ones(len(sorted_keys), bool)
            first[1:] = sorted_keys[1:] != sorted_keys[:-1]
            self._add(sorted_keys[first], sorted_owners[first])
        return self.owners(keys)

    def _add(self, keys: np.ndarray, owners: np.ndarray) -> None:
        self.runs.append((keys, owners))
        while len(self.runs) > 1 and 2 * len(self.runs[-1][0]) >= len(self.runs[-2][0]):
            (k2, o2), (k1, o1) = self.runs.pop(), self.runs.pop()
            keys, owners = np.concatenate([k1, k2]), np.concatenate([o1, o2])
            order = np.argsort(keys, kind="stable")
            self.runs.append((keys[order], owners[order]))


class IdShard:
    """A registry actor: the claims on the ids whose digest falls to it."""

    def __init__(self, sources: list[str]) -> None:
        self.store = ClaimStore()
        self.sources = sources

    def claim(self, keys: np.ndarray, owners: np.ndarray) -> np.ndarray:
        return self.store.claim(keys, owners)

    def describe(self, owners: list[int]) -> list[str]:
        return [describe(owner, self.sources) for owner in owners]


def describe(owner: int, sources: list[str]) -> str:
    """Where the row that owns an id is: `<file>:<row>`, as derived ids name rows."""
    if owner == COMMITTED:
        return "a row an earlier run wrote to this output"
    return f"{sources[owner >> FILE_SHIFT]}:{owner & ((1 << FILE_SHIFT) - 1)}"


class IdRegistry:
    """The registry's actors, as a handle that read tasks carry."""

    def __init__(self, shards: list[Any]) -> None:
        self.shards = shards

    @classmethod
    def start(cls, shards: int, sources: list[str]) -> IdRegistry:
        """Registry actors on this (the driver's) node: they live and die with the run."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor = ray.remote(num_cpus=0, scheduling_strategy=here)(IdShard)
        return cls([actor.remote(sources) for _ in range(shards)])

    def claim(self, ids: list[str], owners: np.ndarray) -> list[str | None]:
        """Claim `ids` for `owners`; for each, None when it keeps its id, else where the row that
        keeps it is."""
        import ray

        keys = digests(ids)
        shard_of = keys.view(np.uint8).reshape(-1, 16)[:, 0] % len(self.shards)
        winners = np.empty(len(ids), np.int64)
        parts = [np.flatnonzero(shard_of == s) for s in range(len(self.shards))]
        replies = [
            shard.claim.remote(keys[part], owners[part])
            for shard, part in zip(self.shards, parts, strict=True)
            if len(part)
        ]
        for part, reply in zip([p for p in parts if len(p)], ray.get(replies), strict=True):
            winners[part] = reply
        lost = [int(w) for w, o in zip(winners, owners, strict=True) if w != o]
        where = (
            dict(zip(lost, ray.get(self.shards[0].describe.remote(lost)), strict=True))
            if lost
            else {}
        )
        return [None if w == o else where[int(w)] for w, o in zip(winners, owners, strict=True)]

    def close(self) -> None:
        import ray

        for shard in self.shards:
            ray.kill(shard)
