"""Unique ids at any scale: every row claims its id as it is read; the first claim wins.

A later row with an id already claimed is not generated: it is written as an error row naming
the row that keeps the id, with a null id of its own, so no two output rows ever share an id and
no barrier holds generation back. No process holds every id: claims go to registry actors by a
hash of the id, each keeping 128-bit digests and their owners in sorted numpy arrays (24 bytes
an id). A row's owner is its position in the input, so a retried task claims the same ids again
and still wins them. On resume, the ids committed earlier are claimed before any new row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

COMMITTED = -1  # the owner of an id that an earlier run committed
FILE_SHIFT = 40  # an owner is (file index << FILE_SHIFT) | row in that file
ABSENT = -2


def digests(ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes of each id (pandas' vectorized SipHash under two keys): a
    128-bit digest, so two ids collide about once in 10^20 tables of a billion ids."""
    from pandas.util import hash_array

    values = np.array(ids, dtype=object)
    return (
        hash_array(values, hash_key="sdray-ids-key-01", categorize=False),
        hash_array(values, hash_key="sdray-ids-key-02", categorize=False),
    )


class ClaimStore:
    """Digest -> owner, in a few runs sorted by digest and merged as they grow (a lookup
    searches each run; there are at most log2 of the count)."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (hi, lo, owner)

    def __len__(self) -> int:
        return sum(len(hi) for hi, _, _ in self.runs)

    def owners(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """The owner of each digest, or ABSENT where none claimed it yet."""
        order = np.argsort(hi)  # sorted needles search a large run much faster
        hi, lo = hi[order], lo[order]
        found = np.full(len(hi), ABSENT, np.int64)
        for run_hi, run_lo, run_owners in self.runs:
            at = np.searchsorted(run_hi, hi)
            while True:  # digests equal in `hi` only sit side by side: look along them
                same = np.zeros(len(hi), bool)
                inside = at < len(run_hi)
                same[inside] = run_hi[at[inside]] == hi[inside]
                hit = same.copy()
                hit[same] = run_lo[at[same]] == lo[same]
                found[hit] = run_owners[at[hit]]
                further = same & ~hit
                if not further.any():
                    break
                at = np.where(further, at + 1, len(run_hi))
        unsorted = np.empty_like(found)
        unsorted[order] = found
        return unsorted

    def claim(self, hi: np.ndarray, lo: np.ndarray, owners: np.ndarray) -> np.ndarray:
        """Give each unclaimed digest to its smallest claimant here; return every one's owner."""
        found = self.owners(hi, lo)
        new = found == ABSENT
        if new.any():
            hi_new, lo_new, owners_new = hi[new], lo[new], owners[new]
            order = np.lexsort((owners_new, lo_new, hi_new))
            hi_new, lo_new, owners_new = hi_new[order], lo_new[order], owners_new[order]
            first = np.ones(len(order), bool)
            first[1:] = (hi_new[1:] != hi_new[:-1]) | (lo_new[1:] != lo_new[:-1])
            self._add(hi_new[first], lo_new[first], owners_new[first])
            # each new digest's owner: the first (smallest) claimant of its run of equals
            winners = np.empty(len(order), np.int64)
            winners[order] = owners_new[first][np.cumsum(first) - 1]
            found[new] = winners
        return found

    def _add(self, hi: np.ndarray, lo: np.ndarray, owners: np.ndarray) -> None:
        self.runs.append((hi, lo, owners))
        while len(self.runs) > 1 and 2 * len(self.runs[-1][0]) >= len(self.runs[-2][0]):
            (new_hi, new_lo, new_owners), (hi, lo, owners) = self.runs.pop(), self.runs.pop()
            at = np.searchsorted(hi, new_hi)  # merge two sorted runs in one pass
            self.runs.append(
                (
                    np.insert(hi, at, new_hi),
                    np.insert(lo, at, new_lo),
                    np.insert(owners, at, new_owners),
                )
            )


class IdShard:
    """A registry actor: the claims on the ids whose digest falls to it."""

    def __init__(self, sources: list[str]) -> None:
        self.store = ClaimStore()
        self.sources = sources

    def claim(self, hi: np.ndarray, lo: np.ndarray, owners: np.ndarray) -> np.ndarray:
        return self.store.claim(hi, lo, owners)

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

    def claim(self, ids: list[str], owners: np.ndarray) -> dict[int, str]:
        """Claim `ids` for `owners`; return, for each id another row keeps, its position in
        `ids` -> where that row is (empty when every id is kept)."""
        import ray

        hi, lo = digests(ids)
        shard_of = hi % len(self.shards)
        winners = np.empty(len(ids), np.int64)
        parts = [np.flatnonzero(shard_of == s) for s in range(len(self.shards))]
        parts = [(shard, part) for shard, part in zip(self.shards, parts, strict=True) if len(part)]
        replies = [shard.claim.remote(hi[part], lo[part], owners[part]) for shard, part in parts]
        for (_, part), reply in zip(parts, ray.get(replies), strict=True):
            winners[part] = reply
        lost = np.flatnonzero(winners != owners)
        if not len(lost):
            return {}
        keepers = np.unique(winners[lost]).tolist()
        where = dict(zip(keepers, ray.get(self.shards[0].describe.remote(keepers)), strict=True))
        return {int(i): where[int(w)] for i, w in zip(lost, winners[lost], strict=True)}

    def close(self) -> None:
        import ray

        for shard in self.shards:
            ray.kill(shard)
