"""Long-tailed class profiles applied to a training set before it is split across clients.

The exponential profile is the one every CIFAR-LT paper uses (Cao et al. 2019; LDAM-DRW,
FedLoGe, CReFF): class ``i`` keeps ``floor(n_max * IF^(-i/(C-1)))`` samples, so class 0 is the
head and class ``C-1`` the tail with ``n_max / IF`` samples. The test set stays balanced.

:data:`PROFILES` declares the profiles once, with the parameters a scenario may set under
``[long_tail]``. Every rule on them can be checked from the scenario alone, so errors here are plain
``ValueError``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field

from fedlt.base.registry import Entry, NoParams, Params, Registry
from fedlt.errors import ScenarioError

__all__ = ["PROFILES", "exponential_counts", "long_tail_counts", "step_counts", "subsample_long_tail"]

# Relative slack for floor(): n_max * IF^(-r) may land a hair below an integer it equals exactly
# (e.g. 8^(-1/3) * 5000), and floor() would then lose a sample that the maths keeps.
_FLOOR_SLACK = 1e-9


def _floor(x: float) -> int:
    return math.floor(x * (1.0 + _FLOOR_SLACK))


def _check_factor(imbalance_factor: float) -> None:
    if not (imbalance_factor >= 1 and math.isfinite(imbalance_factor)):
        raise ValueError(
            f"imbalance_factor must be a finite float >= 1 (n_max / n_min), got {imbalance_factor!r}; "
            "IF = 100 means a 100:1 tail (codebases passing 0.01 mean the same thing)"
        )


def _check_sizes(n_max: int, num_classes: int) -> None:
    if n_max < 0:
        raise ValueError(f"n_max must be an int >= 0, got {n_max!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")


def exponential_counts(n_max: int, num_classes: int, imbalance_factor: float) -> np.ndarray:
    """Per-class counts of the exponential profile, head (class 0) first.

    Computed as ``floor(n_max * (1/IF)^(i/(C-1)))`` like the reference implementations, so that
    CIFAR-10-LT with IF 100 gives ``[5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]``.

    Parameters
    ----------
    n_max : int
        Samples of the head class.
    num_classes : int
        Number of classes ``C``.
    imbalance_factor : float
        ``IF = n_max / n_min`` (>= 1; 1 gives a flat profile).

    Returns
    -------
    np.ndarray
        int64 array of shape ``(C,)``.
    """
    _check_factor(imbalance_factor)
    _check_sizes(n_max, num_classes)
    if num_classes == 1:
        return np.array([n_max], dtype=np.int64)
    ratio = 1.0 / imbalance_factor
    return np.array(
        [_floor(n_max * ratio ** (i / (num_classes - 1.0))) for i in range(num_classes)], dtype=np.int64
    )


def step_counts(
    n_max: int, num_classes: int, imbalance_factor: float, fraction_minority: float = 0.5
) -> np.ndarray:
    """Per-class counts of the step profile: majority classes at ``n_max``, minority at ``n_max/IF``.

    The last ``floor(fraction_minority * C)`` classes are the minority (Buda et al. 2018's step
    imbalance), so the head still comes first as in the exponential profile.

    Returns
    -------
    np.ndarray
        int64 array of shape ``(C,)``.
    """
    _check_factor(imbalance_factor)
    _check_sizes(n_max, num_classes)
    if not 0 <= fraction_minority <= 1:
        raise ValueError(f"fraction_minority must be a float in [0, 1], got {fraction_minority!r}")
    n_minority = _floor(fraction_minority * num_classes)
    counts = np.full(num_classes, n_max, dtype=np.int64)
    counts[num_classes - n_minority :] = _floor(n_max / imbalance_factor)
    return counts


_IMBALANCE = "IF = n_max / n_min (100 means a 100:1 tail; 1 is flat)."
_N_MAX = "Samples kept for the head class (default: all it has)."


class ExponentialParams(Params):
    """``exponential``: n_i = floor(n_max * IF^(-i/(C-1)))."""

    imbalance_factor: float = Field(1.0, ge=1, allow_inf_nan=False, description=_IMBALANCE)
    n_max: int | None = Field(None, gt=0, description=_N_MAX)


class StepParams(Params):
    """``step``: majority classes at n_max, minority classes at n_max / IF."""

    imbalance_factor: float = Field(1.0, ge=1, allow_inf_nan=False, description=_IMBALANCE)
    n_max: int | None = Field(None, gt=0, description=_N_MAX)
    fraction_minority: float = Field(0.5, gt=0, lt=1, description="Share of classes that are minority.")


def _none(available: np.ndarray) -> np.ndarray:
    return available.copy()


def _exponential(available: np.ndarray, imbalance_factor: float, n_max: int | None) -> np.ndarray:
    head = int(available.max()) if n_max is None else int(n_max)
    return exponential_counts(head, len(available), imbalance_factor)


def _step(
    available: np.ndarray, imbalance_factor: float, n_max: int | None, fraction_minority: float
) -> np.ndarray:
    head = int(available.max()) if n_max is None else int(n_max)
    return step_counts(head, len(available), imbalance_factor, fraction_minority)


#: Every long-tail profile a scenario can name; ``build(available, **params) -> per-class counts``
#: (before capping at what each class has).
PROFILES = Registry(
    "long-tail profile",
    [
        Entry("none", NoParams, "Keep every training sample.", _none),
        Entry(
            "exponential", ExponentialParams, "n_i = floor(n_max * IF^(-i/(C-1))) (CIFAR-LT).", _exponential
        ),
        Entry("step", StepParams, "Two levels: n_max, and n_max / IF for the minority (Buda et al.).", _step),
    ],
)


def long_tail_counts(available: np.ndarray, profile: str, **params: Any) -> np.ndarray:
    """How many training samples each class keeps under ``profile``.

    Parameters
    ----------
    available : np.ndarray
        Per-class counts of the full training split.
    profile : str
        One of :data:`PROFILES`; ``"none"`` keeps everything.
    **params
        The profile's parameters: ``imbalance_factor`` (``n_max / n_min``), ``n_max`` (head-class
        size, default ``available.max()``), and for ``step`` ``fraction_minority``.

    Returns
    -------
    np.ndarray
        int64 ``(C,)``, each entry capped at ``available[c]`` so the result can always be drawn.

    Raises
    ------
    ValueError
        An unknown profile, or parameters it does not take or out of range.
    ScenarioError
        The profile would leave a class that has training samples with none
        (``long_tail.imbalance_factor`` above ``n_max``): its test samples could never be learned
        and its per-class metrics would measure nothing but the profile.
    """
    available = np.asarray(available, dtype=np.int64)
    entry = PROFILES[profile]
    checked = dict(entry.params.model_validate(params))
    counts = np.minimum(entry.build(available, **checked), available)
    emptied = np.flatnonzero((counts == 0) & (available > 0))
    if emptied.size:
        head = int(available.max()) if checked.get("n_max") is None else int(checked["n_max"])
        raise ScenarioError(
            "long_tail.imbalance_factor",
            checked.get("imbalance_factor"),
            f"at most n_max = {head} (the head class's samples), so that every class keeps a training sample",
            hint=f"The {profile} profile gives train_class_counts {counts.tolist()}: class(es) "
            f"{emptied.tolist()} would have none. Lower long_tail.imbalance_factor or raise long_tail.n_max.",
        )
    return counts


def subsample_long_tail(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a random subset of ``labels`` holding exactly ``counts[c]`` samples of class ``c``.

    Each class's indices are shuffled with ``rng`` and the first ``counts[c]`` kept, as the CIFAR-LT
    builders do; the result is sorted so it indexes the original split in its own order.

    Raises
    ------
    ValueError
        If a class has fewer samples than asked for.
    """
    labels = np.asarray(labels)
    counts = np.asarray(counts, dtype=np.int64)
    kept: list[np.ndarray] = []
    for c, n_keep in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if n_keep > len(idx) or n_keep < 0:
            raise ValueError(f"class {c} has {len(idx)} samples, cannot keep {int(n_keep)}")
        kept.append(rng.permutation(idx)[:n_keep])
    if not kept:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(kept)).astype(np.int64, copy=False)
