"""Distributed sampler drawing uniformly over the non-empty pseudo-label clusters.

The draw of an epoch is a deterministic function of (labels, seed, epoch), the same on every rank:
- each non-empty cluster gets exactly `quota = ceil(N' / K')` draws (N' labelled points, K'
  non-empty clusters): without replacement when the cluster has at least `quota` members, with
  replacement when it is smaller;
- the T = quota * K' draws are in one global shuffled order, padded (by repeating its first items,
  like torch's DistributedSampler) to a multiple of the world size W;
- rank r takes positions r, r+W, r+2W, ... (strided: at any step the W ranks read W consecutive
  items of the global order), so every rank yields exactly `per_rank` indices (no DDP hang) and the
  union over ranks is the global draw;
- `start` skips the first `start` indices of this rank's share, to resume mid-epoch exactly.

No rank materialises the global draw; each computes its own positions only. A keyed pseudo-random
permutation of [0, T) (a Feistel network with cycle walking, keyed by (seed, epoch)) sends a
position to (cluster, slot); the slot picks a member through a keyed permutation of the cluster's
members (without replacement) or a keyed uniform draw (with replacement, for a cluster smaller than
the quota), members being numbered in dataset order within their cluster; one chunked pass over the
labels then finds those members' dataset indices. Per rank and epoch this costs O(N) time and,
beyond the N-long label array, O(N/W + K) memory (the share, per-label counts) plus a bit set of
the wanted members, 3/16 byte per labelled image (1/21 of the label array); no grouping of members
by cluster is built.
This draw order replaced (issue 9) a global shuffle that every rank computed in full: the
guarantees are the same, the order, and so a run's numbers, differ from earlier versions.

Unlike the original DeepCluster sampler (which mixes positions in its reassigned dataset with
dataset indices), the draw is uniform over clusters: each cluster's share is exactly 1/K' of the
draw before padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

_CHUNK = 1 << 16  # labels (or draws) handled per step: bounds the temporaries to a few MB
# 8 Feistel rounds: 6 leave the permutations of tiny domains (a few members) visibly non-uniform over keys
_ROUND_CONSTANTS = np.arange(1, 9, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
_U64 = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array the caller owns: a bijective, well-mixing
    hash (the multiplications wrap by design)."""
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (SWAR; np.bitwise_count needs numpy 2)."""
    x = x - ((x >> _U64(1)) & _U64(0x5555555555555555))
    x = (x & _U64(0x3333333333333333)) + ((x >> _U64(2)) & _U64(0x3333333333333333))
    x = (x + (x >> _U64(4))) & _U64(0x0F0F0F0F0F0F0F0F)
    return (x * _U64(0x0101010101010101)) >> _U64(56)


def _bit_length(n: np.ndarray) -> np.ndarray:
    """Bits needed for values below n (n >= 1), elementwise: bit_length(n - 1)."""
    return np.frexp((n - _U64(1)).astype(np.float64))[1].astype(np.uint64)  # exact below 2**53


def _feistel(x: np.ndarray, bits: np.ndarray, key: np.ndarray) -> np.ndarray:
    """A keyed bijection of [0, 2**bits) (bits and key broadcast against x)."""
    lo_bits = bits >> _U64(1)
    hi_bits = bits - lo_bits
    lo, hi = x & ((_U64(1) << lo_bits) - _U64(1)), x >> lo_bits
    # a round keeps the top `width` bits of its hash: shift by 63 - width, then by 1 (64 is undefined)
    lo_shift, hi_shift = _U64(63) - lo_bits, _U64(63) - hi_bits
    for i, constant in enumerate(_ROUND_CONSTANTS):
        # each round xors one half with a keyed hash of the other: the top bits of a multiply-xorshift
        # hash (cheaper than a full _mix, and its top bits depend on every input bit)
        half, other, shift = (lo, hi, lo_shift) if i % 2 == 0 else (hi, lo, hi_shift)
        h = other ^ key
        h += constant
        h *= _U64(0xBF58476D1CE4E5B9)
        h ^= h >> _U64(29)
        h *= _U64(0x94D049BB133111EB)
        h >>= shift
        h >>= _U64(1)
        half ^= h
    hi <<= lo_bits
    hi |= lo
    return hi


def keyed_permutation(x: np.ndarray, size, key) -> np.ndarray:
    """pi(x) for a keyed pseudo-random permutation pi of [0, size); x is a uint64 array, size and
    key uint64 scalars or arrays like x. Cycle walking restricts a Feistel bijection of [0, 2**bits)
    (2**bits < 2 * size) to [0, size): fewer than two passes of the network per value on average."""
    size = np.asarray(size, dtype=np.uint64)
    key = _mix(np.array(key, dtype=np.uint64, ndmin=1) ^ _U64(0x9E3779B97F4A7C15))  # unrelated keys from related ones
    bits = _bit_length(size)
    # as arrays (no copy): numpy's scalar arithmetic would warn on the hash's intended wrap-around
    size, bits, key = (np.broadcast_to(v, x.shape) for v in (size, bits, key))
    out = _feistel(x, bits, key)
    todo = np.flatnonzero(out >= size)
    size, bits, key = size[todo], bits[todo], key[todo]
    while todo.size:
        walked = _feistel(out[todo], bits, key)
        out[todo] = walked
        keep = walked >= size
        todo, size, bits, key = todo[keep], size[keep], bits[keep], key[keep]
    return out


def _uniform_below(x: np.ndarray, size: np.ndarray, key) -> np.ndarray:
    """A keyed uniform integer in [0, size) for every x (size < 2**31; bias below size / 2**32)."""
    h = _mix(x ^ key)
    h >>= _U64(32)
    h *= size
    h >>= _U64(32)
    return h


def _label_order(chunk: np.ndarray, wide: bool) -> np.ndarray:
    """Stable order of a chunk by label, labels < 0 last: an LSD radix sort on 16-bit digits (numpy's
    stable argsort of uint16 is a radix sort, several times faster than sorting wider keys)."""
    keys = chunk.astype(np.uint32)
    keys[chunk < 0] = 0xFFFFFFFF
    if not wide:  # every label < 0xFFFF
        return np.argsort(np.minimum(keys, 0xFFFF).astype(np.uint16), kind="stable")
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    return order[np.argsort((keys[order] >> 16).astype(np.uint16), kind="stable")]


class _BitSet:
    """A set of integers in [0, size) as bits, with a rank directory (members below each 64-bit word)
    to number its members 0, 1, ... in order: size / 8 + size / 16 bytes."""

    def __init__(self, size: int):
        self.words = np.zeros(size // 64 + 1, dtype=np.uint64)
        self.before: np.ndarray | None = None

    def add(self, values: np.ndarray) -> None:
        np.bitwise_or.at(self.words, values >> 6, _U64(1) << (values & 63).astype(np.uint64))

    def freeze(self) -> int:
        """Build the rank directory once every member is added; returns the number of members."""
        counts = _popcount(self.words).astype(np.int32 if self.words.size * 64 < 2**31 else np.int64)
        self.before = np.cumsum(counts, dtype=counts.dtype)
        self.before -= counts
        return int(self.before[-1] + counts[-1])

    def contains(self, values: np.ndarray) -> np.ndarray:
        return ((self.words[values >> 6] >> (values & 63).astype(np.uint64)) & _U64(1)).astype(bool)

    def rank(self, members: np.ndarray) -> np.ndarray:
        """The number of members below each of `members`."""
        word = members >> 6
        below = (_U64(1) << (members & 63).astype(np.uint64)) - _U64(1)
        return self.before[word] + _popcount(self.words[word] & below).astype(self.before.dtype)


class UniformClusterSampler(Sampler[int]):
    """torch Sampler of global dataset indices for one rank (see the module docstring).

    len(sampler) is the number of indices still to come on this rank (per_rank - start). Build it
    once per cycle (labels fixed) and call set_epoch/set_start: the per-cluster counts are kept.
    """

    def __init__(self, labels: np.ndarray, *, world_size: int, rank: int, seed: int, epoch: int = 0,
                 start: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world size {world_size}")
        self.labels = np.asarray(labels).ravel()
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.index_dtype = np.int32 if self.labels.size < 2**31 else np.int64  # halves memory at 100M images
        counts = self._label_counts()
        self.cluster_ids = np.flatnonzero(counts)  # the K' non-empty clusters
        self.cluster_sizes = counts[self.cluster_ids].astype(np.uint64)
        # Members grouped by label, in dataset order within a label: where each label's group starts.
        # The grouping itself is never built; the label scan in _members_at finds the members it needs.
        self.label_starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.uint64)
        self.num_labelled = int(counts.sum())
        self.num_clusters = int(self.cluster_ids.size)  # K'
        self.quota = math.ceil(self.num_labelled / self.num_clusters) if self.num_clusters else 0
        self.total = self.quota * self.num_clusters  # draws before padding
        self.per_rank = math.ceil(self.total / self.world_size)
        self._cache: tuple[tuple[int, int], np.ndarray] | None = None
        self.start = 0
        self.set_start(start)

    def _label_counts(self) -> np.ndarray:
        """Members per label value (labels < 0 excluded), counted in chunks (no N-long temporary)."""
        top = int(self.labels.max()) if self.labels.size else -1
        counts = np.zeros(top + 1, dtype=np.int64)
        for a in range(0, self.labels.size, _CHUNK):
            chunk = self.labels[a:a + _CHUNK]
            counts += np.bincount(chunk[chunk >= 0], minlength=top + 1)
        return counts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start {start} outside [0, {self.per_rank}] for this rank")
        self.start = int(start)

    def rank_indices(self) -> np.ndarray:
        """The dataset indices this rank still yields this epoch (its share from `start` on)."""
        if self._cache is None or self._cache[0] != (self.epoch, self.start):
            self._cache = None  # the stale share is not kept while the new one is drawn
            self._cache = ((self.epoch, self.start), self._draw(self.start))
        return self._cache[1]

    def _draw(self, first: int) -> np.ndarray:
        count = self.per_rank - first
        if count == 0:
            return np.empty(0, dtype=self.index_dtype)
        keys = np.random.SeedSequence([self.seed, self.epoch]).generate_state(3, dtype=np.uint64)
        # drawn[i]: where this rank's i-th draw (from `first` on) sits in the grouping of members by label
        drawn = np.empty(count, dtype=self.index_dtype)
        wanted = _BitSet(self.num_labelled)
        for a in range(0, count, _CHUNK):
            b = min(a + _CHUNK, count)
            positions = self.rank + self.world_size * np.arange(first + a, first + b, dtype=np.uint64)
            drawn[a:b] = self._grouped_positions(positions % _U64(self.total), keys)
            wanted.add(drawn[a:b])
        found = self._members_at(wanted)
        for a in range(0, count, _CHUNK):  # in place: grouped position -> dataset index
            drawn[a:a + _CHUNK] = found[wanted.rank(drawn[a:a + _CHUNK])]
        return drawn

    def _grouped_positions(self, positions: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Global draw positions (in [0, T)) -> positions in the grouping of members by label."""
        drawn = keyed_permutation(positions, self.total, keys[0])  # cluster-major: slot `slot` of cluster k
        k = drawn // _U64(self.quota)
        slot = drawn - k * _U64(self.quota)
        size = self.cluster_sizes[k]
        cluster = self.cluster_ids[k]
        member = np.empty_like(slot)
        big = size >= _U64(self.quota)
        # a keyed permutation of each big cluster's members: its quota slots take distinct members
        member[big] = keyed_permutation(slot[big], size[big], cluster[big].astype(np.uint64) ^ keys[1])
        small = ~big
        member[small] = _uniform_below(drawn[small], size[small], keys[2])  # with replacement
        return self.label_starts[cluster] + member

    def _members_at(self, wanted: _BitSet) -> np.ndarray:
        """Dataset indices of the members at the `wanted` grouped positions (in rank order), found in
        one chunked pass over the labels: a member's grouped position is its label's start plus the
        number of members of that label before it."""
        found = np.empty(wanted.freeze(), dtype=self.index_dtype)
        seen = np.zeros(self.label_starts.size, dtype=np.int64)  # members of each label so far
        wide = self.label_starts.size >= 0xFFFF
        for a in range(0, self.labels.size, _CHUNK):
            chunk = self.labels[a:a + _CHUNK]
            order = _label_order(chunk, wide)[:np.count_nonzero(chunk >= 0)]
            label = chunk[order]
            first = np.flatnonzero(np.concatenate([[True], label[1:] != label[:-1]]))
            run_label, run_length = label[first], np.diff(np.append(first, label.size))
            base = self.label_starts[run_label].astype(np.int64) + seen[run_label] - first
            position = np.repeat(base, run_length) + np.arange(label.size)
            seen[run_label] += run_length
            hit = np.flatnonzero(wanted.contains(position))
            found[wanted.rank(position[hit])] = a + order[hit]
        return found

    def __iter__(self) -> Iterator[int]:
        # A chunk's Python ints at a time: the whole share as a list would take ~36 bytes per draw
        # (an int object and a pointer), 9x the share array itself.
        share = self.rank_indices()
        for a in range(0, share.size, _CHUNK):
            yield from share[a:a + _CHUNK].tolist()

    def __len__(self) -> int:
        return self.per_rank - self.start
