"""Fixed-capacity replay memories of dataset *indices* and the policies that fill them.

A memory holds at most ``capacity`` (dataset index, label) pairs of items a client has seen in
its stream. Items are offered one at a time, in stream order; a *policy* decides whether the item
is stored and which stored item it overwrites. The policies:

``reservoir`` (Vitter's Algorithm R)
    Item ``n`` (0-based count of items seen before it) goes to slot ``n`` while ``n < K``;
    afterwards draw ``r ~ U{0..n}`` and overwrite slot ``r`` if ``r < K``, else discard. Every
    item seen so far is in memory with probability ``K / (n + 1)``: memory mirrors the stream's
    class skew.
``cbrs`` (class-balancing reservoir sampling; Chrysakis & Moens, ICML 2020)
    ``n_y`` counts the stream items of class ``y``. While memory is not full, store. Once full,
    every currently-largest class joins the set ``F`` of *full* classes, for good (sticky). An
    item of a class not in ``F`` is always stored, overwriting a uniformly random item of a class
    drawn uniformly among the currently-largest ones; an item of a full class ``y`` is stored with
    probability ``|M_y| / n_y`` (a per-class reservoir), overwriting a random stored item of ``y``.
``gdumb`` (greedy class-balanced sampler; Prabhu et al., ECCV 2020)
    While memory is not full, store. Once full, store iff ``|M_y| < K / |Y_seen|`` (``Y_seen``:
    the classes in the stream so far, ``y`` included), evicting a random item of a class drawn
    uniformly among the currently-largest ones; otherwise discard. Only GDumb's memory policy:
    its retraining from scratch on memory is not part of this module.
``balanced`` (class-balanced reservoir; cf. Avalanche's ``ClassBalancedBuffer`` and mammoth's
``balancoir``)
    While memory is not full, store. Once full, an item whose class holds fewer than its fair
    share ``K / |Y_seen|`` is always stored, evicting a random item of a uniformly drawn
    currently-largest class (GDumb's rule); an item of a class at or above its share is stored
    with probability ``|M_y| / n_y``, overwriting a random stored item of ``y`` (a per-class
    reservoir, so each class keeps a uniform sample of *its* stream rather than GDumb's first
    arrivals). Unlike ``cbrs`` the threshold is the fair share, not the sticky "ever largest".
``evict-largest`` (the online memory update of the CLIB / Si-Blurry code's GDumb and
Rainbow-Memory baselines, ``update_memory`` in ``methods/gdumb.py`` and
``methods/rainbow_memory.py``)
    While memory is not full, store. Once full, the item is **always** stored: count the memory's
    classes *with the newcomer added*, draw a class uniformly among the largest ones and overwrite
    a uniformly random stored item of it (so an item of the largest class replaces one of its own
    class). One deviation: a largest class must hold a stored item, so the newcomer's class is
    left out of the draw when memory holds none of it (the reference would then draw from an
    empty slot list and fail). Only the online rule: Rainbow-Memory's uncertainty-based
    selection at task ends and GDumb's retraining on memory are not part of this module.

All randomness comes from the ``torch.Generator`` passed in (CPU), so a memory's evolution is a
function of the seed. The state is plain Python containers kept in the caller's dict, so it can
be checkpointed and shipped with a client's task as is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "POLICIES",
    "Admission",
    "ClassMemory",
    "Policy",
    "draw_replay",
    "inverse_frequency_weights",
]

Policy = Literal["reservoir", "cbrs", "gdumb", "balanced", "evict-largest"]
POLICIES: tuple[str, ...] = ("reservoir", "cbrs", "gdumb", "balanced", "evict-largest")


def _randint(high: int, generator: torch.Generator) -> int:
    """A uniform integer in ``[0, high)``."""
    return int(torch.randint(high, (1,), generator=generator))


@dataclass(frozen=True)
class Admission:
    """What offering one item did (returned so tests and callers can audit a policy).

    Attributes
    ----------
    slot : int or None
        Where the item was stored; ``None`` when it was discarded.
    evicted_index, evicted_label : int or None
        The dataset index and label the item overwrote; ``None`` when it filled a free slot or
        was discarded.
    """

    slot: int | None
    evicted_index: int | None = None
    evicted_label: int | None = None


class ClassMemory:
    """A replay memory of at most ``capacity`` (dataset index, label) pairs under one policy.

    The memory lives in ``state`` (a plain dict it mutates in place): ``indices`` and ``labels``
    (lists, one entry per slot), ``n_seen`` (items offered so far), ``class_seen`` (dict: class
    -> items of that class offered so far) and ``full`` (the sticky CBRS full classes, sorted).
    Wrapping the plugin's per-client ``state`` keeps the memory checkpointed with no copying.

    Parameters
    ----------
    capacity : int
        ``K``, the most items stored.
    policy : {"reservoir", "cbrs", "gdumb", "balanced", "evict-largest"}
        How items are admitted and evicted (see the module docstring).
    state : dict, optional
        The dict holding the memory; a new empty memory when omitted or empty.
    """

    def __init__(self, capacity: int, policy: Policy, state: dict[str, Any] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"The memory capacity must be an int >= 1. Got {capacity!r} instead.")
        if policy not in POLICIES:
            raise ValueError(f"The memory policy must be one of {POLICIES}. Got {policy!r} instead.")
        self.capacity = capacity
        self.policy = policy
        self.state = state if state is not None else {}
        s = self.state
        s.setdefault("indices", [])
        s.setdefault("labels", [])
        s.setdefault("n_seen", 0)
        s.setdefault("class_seen", {})
        s.setdefault("full", [])
        if len(s["indices"]) != len(s["labels"]) or len(s["indices"]) > capacity:
            raise ValueError(
                f"A replay memory state must hold at most {capacity} (index, label) pairs of equal "
                f"length. Got {len(s['indices'])} indices and {len(s['labels'])} labels instead."
            )
        # Derived bookkeeping (not stored): items per class in memory.
        self.counts: dict[int, int] = {}
        for label in s["labels"]:
            self.counts[label] = self.counts.get(label, 0) + 1
        self._full = set(s["full"])

    # ------------------------------------------------------------------ views

    @property
    def indices(self) -> list[int]:
        return self.state["indices"]

    @property
    def labels(self) -> list[int]:
        return self.state["labels"]

    @property
    def n_seen(self) -> int:
        return self.state["n_seen"]

    def __len__(self) -> int:
        return len(self.state["indices"])

    def largest_classes(self) -> list[int]:
        """The classes with the most items in memory, sorted (empty when memory is empty)."""
        if not self.counts:
            return []
        top = max(self.counts.values())
        return sorted(c for c, n in self.counts.items() if n == top)

    def _largest_with(self, label: int) -> list[int]:
        """The largest classes once a newcomer of ``label`` is counted, among those with a stored
        item, sorted (``evict-largest``)."""
        counts = dict(self.counts)
        counts[label] = counts.get(label, 0) + 1
        top = max(n for c, n in counts.items() if self.counts.get(c, 0))
        return sorted(c for c, n in counts.items() if n == top and self.counts.get(c, 0))

    # ------------------------------------------------------------------ updates

    def extend(self, indices: Iterable[int], labels: Iterable[int], generator: torch.Generator) -> None:
        """Offer items in stream order."""
        for index, label in zip(indices, labels, strict=True):
            self.offer(index, label, generator)

    def offer(self, index: int, label: int, generator: torch.Generator) -> Admission:
        """Offer one stream item; returns where it went and what it overwrote."""
        s = self.state
        n_before = s["n_seen"]
        s["n_seen"] = n_before + 1
        seen = s["class_seen"]
        seen[label] = seen.get(label, 0) + 1
        if len(s["indices"]) < self.capacity:
            return self._append(index, label)
        if self.policy == "reservoir":
            r = _randint(n_before + 1, generator)
            return self._replace(r, index, label) if r < self.capacity else Admission(None)
        if self.policy == "cbrs":
            largest = self.largest_classes()
            new_full = self._full.union(largest)
            if new_full != self._full:
                self._full = new_full
                s["full"] = sorted(new_full)
            if label not in self._full:
                return self._evict_largest(largest, index, label, generator)
            return self._class_reservoir(index, label, generator)
        if self.policy == "evict-largest":
            return self._evict_largest(self._largest_with(label), index, label, generator)
        # gdumb and balanced: the fair share K / |Y_seen| decides.
        if self.counts.get(label, 0) < self.capacity / len(seen):
            return self._evict_largest(self.largest_classes(), index, label, generator)
        if self.policy == "gdumb":
            return Admission(None)
        return self._class_reservoir(index, label, generator)

    def _append(self, index: int, label: int) -> Admission:
        self.state["indices"].append(index)
        self.state["labels"].append(label)
        self.counts[label] = self.counts.get(label, 0) + 1
        return Admission(len(self.state["indices"]) - 1)

    def _replace(self, slot: int, index: int, label: int) -> Admission:
        s = self.state
        old_index, old_label = s["indices"][slot], s["labels"][slot]
        s["indices"][slot], s["labels"][slot] = index, label
        self.counts[old_label] -= 1
        if not self.counts[old_label]:
            del self.counts[old_label]
        self.counts[label] = self.counts.get(label, 0) + 1
        return Admission(slot, old_index, old_label)

    def _random_slot_of(self, label: int, generator: torch.Generator) -> int:
        slots = [i for i, c in enumerate(self.state["labels"]) if c == label]
        return slots[_randint(len(slots), generator)]

    def _evict_largest(
        self, largest: Sequence[int], index: int, label: int, generator: torch.Generator
    ) -> Admission:
        victim = largest[_randint(len(largest), generator)] if len(largest) > 1 else largest[0]
        return self._replace(self._random_slot_of(victim, generator), index, label)

    def _class_reservoir(self, index: int, label: int, generator: torch.Generator) -> Admission:
        # Store with probability |M_y| / n_y: an integer draw r ~ U{0..n_y-1} is below |M_y|.
        stored = self.counts.get(label, 0)
        if stored and _randint(self.state["class_seen"][label], generator) < stored:
            return self._replace(self._random_slot_of(label, generator), index, label)
        return Admission(None)


# --------------------------------------------------------------------------- replay batches


def draw_replay(
    labels: Sequence[int],
    n: int,
    sampling: Literal["uniform", "inverse-frequency"],
    generator: torch.Generator,
) -> torch.Tensor:
    """Memory slots to replay: ``min(n, len(labels))`` distinct slots (a CPU long tensor).

    ``uniform`` draws every slot with equal probability; ``inverse-frequency`` draws without
    replacement with ``p_i ∝ 1 / n^mem_{y_i}`` (i-Blurry's ``get_batch(use_weight=True)``), so
    every class present in memory is drawn about equally often.
    """
    m = len(labels)
    n = min(n, m)
    if n <= 0:
        return torch.empty(0, dtype=torch.long)
    if sampling == "uniform":
        return torch.randperm(m, generator=generator)[:n]
    weights = inverse_frequency_weights(labels, labels)
    return torch.multinomial(weights, n, replacement=False, generator=generator)


def inverse_frequency_weights(replayed: Sequence[int], memory_labels: Sequence[int]) -> torch.Tensor:
    """Loss weights ``w_i ∝ 1 / n^mem_{y_i}`` of replayed rows, normalised to mean 1.

    ``n^mem_c`` counts class ``c`` in ``memory_labels``; every replayed label must occur there.
    Example: memory classes ``[0, 0, 0, 1]`` and replayed ``[0, 0, 0, 1]`` give raw weights
    ``[1/3, 1/3, 1/3, 1]`` (mean 1/2), hence ``[2/3, 2/3, 2/3, 2]``.
    """
    if not len(replayed):
        return torch.empty(0)
    counts: dict[int, int] = {}
    for c in memory_labels:
        counts[c] = counts.get(c, 0) + 1
    raw = torch.tensor([1.0 / counts[c] for c in replayed], dtype=torch.float64)
    return (raw / raw.mean()).float()
