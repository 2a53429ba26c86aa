"""Diagnostic metrics of an evaluated model: neural collapse and calibration, as evaluation plugins.

Neither changes training. They read what an evaluation already has (the model's features and
logits on a test set, the true labels, the head) and report numbers that accuracy hides: whether
the features and classifier have settled into the simplex-ETF geometry that long-tailed training
is known to distort (minority collapse squeezes the tail classes' means together), and whether
the predicted probabilities can be trusted, class by class, including the rare ones.

The pure functions below take NumPy arrays or tensors and compute in float64 on the CPU; the
plugin classes only pick the evaluations to run on (``views``) and turn results into JSON-ready
values.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedlt import EvalContext, Plugin, hookimpl

__all__ = [
    "Calibration",
    "NeuralCollapse",
    "calibration_errors",
    "class_means",
    "classwise_ece",
    "equiangularity",
    "equinorm",
    "ncc_mismatch",
    "neural_collapse",
    "self_duality",
    "top_label_ece",
    "within_class_variability",
]

ArrayLike = np.ndarray | torch.Tensor

#: Largest tolerated |row sum - 1| of probabilities (float32 softmax over many classes drifts ~1e-6).
_PROB_SUM_TOL = 1e-4


def _float64(array: ArrayLike, name: str, ndim: int) -> np.ndarray:
    """``array`` as a finite float64 NumPy array of ``ndim`` dimensions (tensors leave the device)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float64).numpy()
    out = np.asarray(array, dtype=np.float64)
    if out.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {out.shape}")
    return out


def _finite(array: np.ndarray, name: str) -> np.ndarray:
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite")
    return array


def _labels(labels: ArrayLike, n: int, num_classes: int | None = None) -> np.ndarray:
    """``labels`` as (n,) int64, checked to lie in ``[0, num_classes)`` (``[0, inf)`` for ``None``)."""
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {y.shape}")
    bad_range = y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes))
    if y.size and (not np.issubdtype(y.dtype, np.integer) or bad_range):
        raise ValueError(f"labels must be integers in [0, {num_classes or 'inf'})")
    return y.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- neural collapse


def _group(h: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(classes, each sample's index into classes, counts, means) of the classes present in y."""
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    # One (K, N) indicator product: a BLAS call, far faster than np.add.reduceat / np.add.at here.
    indicator = (inverse == np.arange(classes.size)[:, None]).astype(np.float64)
    return classes, inverse, counts, (indicator @ h) / np.maximum(counts, 1)[:, None]


def class_means(features: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The classes present in ``labels``, their sample counts and feature means.

    Parameters
    ----------
    features : (N, d) array or tensor
    labels : (N,) array of int

    Returns
    -------
    classes : (K,) int64
        Sorted ids of the classes with at least one sample; only these take part in the
        neural-collapse measures, since an absent class has no mean.
    counts : (K,) int64
    means : (K, d) float64
    """
    h = _finite(_float64(features, "features", 2), "features")
    classes, _, counts, means = _group(h, _labels(labels, h.shape[0]))
    return classes, counts, means


def _centred_means(means: np.ndarray) -> np.ndarray:
    """Class means minus their unweighted average (the global mean of a balanced set).

    Papyan et al. centre on the mean of all samples, which on their balanced training sets is
    the average of the class means. On an imbalanced view (a client's local test set) the sample
    mean is pulled towards the head classes, and an exact simplex ETF would no longer read as
    one; the unweighted average keeps the geometry independent of the class frequencies.
    """
    return means - means.mean(axis=0, keepdims=True) if means.shape[0] else means


def within_class_variability(features: ArrayLike, labels: ArrayLike) -> float | None:
    """NC1 = Tr(Sigma_W Sigma_B^+) / K (Papyan, Han & Donoho, PNAS 2020), K = classes present.

    The within-class spread measured in units of the between-class spread, direction by
    direction: 0 when every sample sits on its class mean. Sigma_B is the covariance of the
    centred class means (each class weighs 1/K), Sigma_W the average over classes of each
    class's covariance (each class weighs 1/K too, so a head class with many samples does not
    stand for the tail; on a balanced test set both equal Papyan's sample averages).

    Sigma_B = M^T M / K has rank at most K - 1, so its pseudo-inverse is taken on the singular
    directions of M above NumPy's rank tolerance; the trace is then a sum over those directions
    v_j of K v_j^T Sigma_W v_j / s_j^2, with no (d, d) matrix formed.

    Returns
    -------
    float or None
        ``None`` with fewer than 2 classes present or all class means equal (no between-class
        spread to measure against).
    """
    h = _finite(_float64(features, "features", 2), "features")
    return _nc1(h, *_group(h, _labels(labels, h.shape[0])))


def _nc1(
    h: np.ndarray, classes: np.ndarray, inverse: np.ndarray, counts: np.ndarray, means: np.ndarray
) -> float | None:
    k = classes.size
    if k < 2:
        return None
    _, s, vt = np.linalg.svd(_centred_means(means), full_matrices=False)
    tol = s.max(initial=0.0) * max(k, h.shape[1]) * np.finfo(np.float64).eps
    keep = (s > tol) & (np.arange(s.size) < k - 1)
    if not keep.any():
        return None
    # R has rows (h_i - mu_{y_i}) / sqrt(K n_{y_i}), so that Sigma_W = R^T R; project onto the
    # kept directions V before subtracting the means, which saves an (N, d) temporary.
    v = vt[keep].T
    projected = (h @ v - (means @ v)[inverse]) / np.sqrt(k * counts[inverse])[:, None]
    # Tr(Sigma_W Sigma_B^+) / K = sum_j ||R v_j||^2 / s_j^2 (the K of Sigma_B^+ cancels the 1/K).
    return float(((projected**2).sum(axis=0) / s[keep] ** 2).sum())


def equinorm(vectors: ArrayLike) -> float | None:
    """Coefficient of variation std / mean of the row norms (NC2, equal norms: 0 at collapse).

    The standard deviation is the population one (``ddof=0``). ``None`` for fewer than 2 rows
    or when every norm is 0.
    """
    v = _float64(vectors, "vectors", 2)
    if v.shape[0] < 2:
        return None
    norms = np.linalg.norm(v, axis=1)
    mean = norms.mean()
    return float(norms.std() / mean) if mean > 0 else None


def equiangularity(vectors: ArrayLike) -> tuple[float, float] | None:
    """NC2's angles between K rows: (std of the pairwise cosines, mean |cos + 1/(K-1)|).

    At collapse the rows form a simplex ETF: every pairwise cosine equals -1/(K-1), the most
    separated arrangement of K vectors, so both numbers are 0. The first says whether the angles
    are equal, the second whether they are the ETF's (equal but smaller angles, as in minority
    collapse, keep the first at 0). Each unordered pair c < c' counts once; the standard
    deviation is the population one.

    Returns
    -------
    tuple of float, or None
        ``None`` for fewer than 2 rows or when a row is zero (its angle is undefined).
    """
    v = _float64(vectors, "vectors", 2)
    k = v.shape[0]
    norms = np.linalg.norm(v, axis=1)
    if k < 2 or not np.all(norms > 0):
        return None
    unit = v / norms[:, None]
    cosines = (unit @ unit.T)[np.triu_indices(k, 1)]
    return float(cosines.std()), float(np.abs(cosines + 1.0 / (k - 1)).mean())


def self_duality(weight: ArrayLike, centred_means: ArrayLike) -> float | None:
    """NC3 = || W / ||W||_F - M / ||M||_F ||_F^2: how far the classifier is from the class means.

    ``weight`` (K, d) are the head rows of the classes in ``centred_means`` (K, d), in the same
    order. 0 when each class's classifier row points along its centred mean, up to one common
    scale; at most 4 (opposite). ``None`` when either matrix is zero.
    """
    w = _float64(weight, "weight", 2)
    m = _float64(centred_means, "centred_means", 2)
    if w.shape != m.shape:
        raise ValueError(f"weight and centred_means must have the same shape, got {w.shape} and {m.shape}")
    w_norm, m_norm = np.linalg.norm(w), np.linalg.norm(m)
    if w_norm == 0 or m_norm == 0:
        return None
    return float(np.sum((w / w_norm - m / m_norm) ** 2))


def ncc_mismatch(
    features: ArrayLike, classes: ArrayLike, means: ArrayLike, predictions: ArrayLike
) -> float | None:
    """NC4: share of samples whose nearest class centre is not the model's predicted class.

    The nearest-class-centre classifier predicts ``classes[argmin_k ||h - mu_k||]`` (ties go to
    the first class); at collapse the trained head behaves exactly like it. A prediction of a
    class with no centre (absent from the labels) always counts as a disagreement. ``None``
    without samples or centres.
    """
    h = _float64(features, "features", 2)
    mu = _float64(means, "means", 2)
    ids = np.asarray(classes, dtype=np.int64)
    pred = (
        predictions.detach().cpu().numpy()
        if isinstance(predictions, torch.Tensor)
        else np.asarray(predictions)
    )
    if pred.shape != (h.shape[0],) or ids.shape != (mu.shape[0],):
        raise ValueError("predictions must have one entry per sample and classes one per mean")
    if h.shape[0] == 0 or mu.shape[0] == 0:
        return None
    # Distances are translation invariant: centre first so the expansion below loses less to
    # cancellation when the features sit far from the origin.
    origin = mu.mean(axis=0, keepdims=True)
    h, mu = h - origin, mu - origin
    squared = (h**2).sum(axis=1, keepdims=True) - 2.0 * h @ mu.T + (mu**2).sum(axis=1)
    nearest = ids[np.argmin(squared, axis=1)]
    return float(np.mean(nearest != pred))


def neural_collapse(
    features: ArrayLike,
    labels: ArrayLike,
    weight: ArrayLike,
    bias: ArrayLike | None = None,
    logits: ArrayLike | None = None,
) -> dict[str, float | int | None]:
    """The four neural-collapse measures of Papyan, Han & Donoho (PNAS 2020) on one test set.

    Only the K classes present in ``labels`` take part (an absent class has no mean); the ETF
    angle -1/(K-1) is that of those K classes.

    Parameters
    ----------
    features : (N, d) array or tensor
        The model's penultimate features h_i (the head's input).
    labels : (N,) array of int
        True classes in ``[0, C)``.
    weight : (C, d) array or tensor
        The linear head's weight; row c is class c's classifier w_c.
    bias : (C,) array or tensor, optional
        The head's bias, used only to predict when ``logits`` is not given.
    logits : (N, C) array or tensor, optional
        The model's scores, prediction = argmax; ``None`` computes ``features @ weight.T + bias``.

    Returns
    -------
    dict
        ``nc1`` (:func:`within_class_variability`); ``nc2_equinorm_means`` /
        ``nc2_equinorm_head`` (:func:`equinorm` of the centred class means / of the head rows
        w_c); ``nc2_cos_std_means`` / ``nc2_cos_std_head`` and ``nc2_etf_gap_means`` /
        ``nc2_etf_gap_head`` (:func:`equiangularity`; the head rows uncentred, as Papyan et al.);
        ``nc3`` (:func:`self_duality` of the present classes' head rows and centred means);
        ``nc4`` (:func:`ncc_mismatch`); ``n_classes`` (K). NC1-NC3 are ``None`` with fewer than
        two classes present, ``nc4`` without samples.
    """
    h = _finite(_float64(features, "features", 2), "features")
    w = _finite(_float64(weight, "weight", 2), "weight")
    if w.shape[1] != h.shape[1]:
        raise ValueError(f"weight must have shape (C, {h.shape[1]}), got {w.shape}")
    y = _labels(labels, h.shape[0], w.shape[0])
    if logits is None:
        scores = h @ w.T + (0.0 if bias is None else _float64(bias, "bias", 1))
    else:
        scores = _float64(logits, "logits", 2)
        if scores.shape != (h.shape[0], w.shape[0]):
            raise ValueError(f"logits must have shape ({h.shape[0]}, {w.shape[0]}), got {scores.shape}")
    predictions = scores.argmax(axis=1) if scores.size else np.zeros(0, dtype=np.int64)
    classes, inverse, counts, means = _group(h, y)
    centred = _centred_means(means)
    head = w[classes]
    two_classes = classes.size >= 2
    angles_means = equiangularity(centred) if two_classes else None
    angles_head = equiangularity(head) if two_classes else None
    return {
        "nc1": _nc1(h, classes, inverse, counts, means),
        "nc2_equinorm_means": equinorm(centred) if two_classes else None,
        "nc2_equinorm_head": equinorm(head) if two_classes else None,
        "nc2_cos_std_means": angles_means[0] if angles_means else None,
        "nc2_cos_std_head": angles_head[0] if angles_head else None,
        "nc2_etf_gap_means": angles_means[1] if angles_means else None,
        "nc2_etf_gap_head": angles_head[1] if angles_head else None,
        "nc3": self_duality(head, centred) if two_classes else None,
        "nc4": ncc_mismatch(h, classes, means, predictions),
        "n_classes": int(classes.size),
    }


# --------------------------------------------------------------------------- calibration


def _probabilities(probs: ArrayLike) -> np.ndarray:
    p = _float64(probs, "probs", 2)
    if p.size and (not np.all((p >= 0) & (p <= 1)) or np.abs(p.sum(axis=1) - 1).max() > _PROB_SUM_TOL):
        raise ValueError("probs must be probabilities: entries in [0, 1], rows summing to 1")
    return p


def _bin_index(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins ((b-1)/B, b/B] as in Guo et al.'s code, with 0 put in the first bin.

    Guo et al. compare against ``np.linspace`` edges (``lower < p <= upper``), which leaves a
    probability of exactly 0 in no bin. Classwise ECE meets such values (a masked class, an
    underflowed softmax), and dropping them would hide the worst mistakes: a sample whose true
    class was given probability 0.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], values, side="left")


def _binned_gap(confidence: np.ndarray, outcome: np.ndarray, index: np.ndarray, n_bins: int) -> float:
    """sum_b |B_b|/N |mean(outcome) - mean(confidence)| = sum_b |sum(outcome) - sum(confidence)| / N."""
    sum_conf = np.bincount(index, weights=confidence, minlength=n_bins)
    sum_out = np.bincount(index, weights=outcome, minlength=n_bins)
    return float(np.abs(sum_out - sum_conf).sum() / confidence.size)


def top_label_ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> float | None:
    """Expected calibration error of the top label (Guo et al., ICML 2017).

    Bins the confidence max_c p_c(x) into ``n_bins`` equal-width bins and averages, weighted by
    bin size, |accuracy - mean confidence| of each non-empty bin. It looks only at the predicted
    class, which is almost always a head class under a long tail, hence :func:`classwise_ece`.
    ``None`` without samples.
    """
    p = _probabilities(probs)
    y = _labels(labels, p.shape[0], p.shape[1])
    if y.size == 0:
        return None
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    return _binned_gap(confidence, correct, _bin_index(confidence, n_bins), n_bins)


def classwise_ece(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> np.ndarray | None:
    """Per-class expected calibration error (Kull et al., NeurIPS 2019, "classwise-ECE").

    For each class c, the probabilities p_c(x) of all N samples (not only those predicted c)
    are put into ``n_bins`` equal-width bins, and ECE_c = sum_b |B_b|/N |mean(1[y = c]) -
    mean(p_c)| over the non-empty bins. A tail class the model never predicts still gets a
    score, and one absent from the labels measures the probability mass wasted on it.

    Returns
    -------
    (C,) float64 array or None
        ECE_c for every class; ``None`` without samples.
    """
    p = _probabilities(probs)
    n, c = p.shape
    y = _labels(labels, n, c)
    if n == 0:
        return None
    onehot = (y[:, None] == np.arange(c)).astype(np.float64)
    # One bincount for all classes: class c's bins are c * B ... c * B + B - 1.
    index = (_bin_index(p, n_bins) + np.arange(c) * n_bins).ravel()
    sum_conf = np.bincount(index, weights=p.ravel(), minlength=c * n_bins).reshape(c, n_bins)
    sum_out = np.bincount(index, weights=onehot.ravel(), minlength=c * n_bins).reshape(c, n_bins)
    return np.abs(sum_out - sum_conf).sum(axis=1) / n


def calibration_errors(probs: ArrayLike, labels: ArrayLike, n_bins: int = 15) -> dict[str, Any]:
    """Top-label ECE and classwise ECE (per class and their mean) as JSON-ready values.

    Returns
    -------
    dict
        ``ece`` (:func:`top_label_ece`), ``classwise_ece`` (mean of ECE_c over all C classes, as
        Kull et al. average) and ``classwise_ece_per_class`` (C floats); ``None`` values without
        samples.
    """
    per_class = classwise_ece(probs, labels, n_bins)
    return {
        "ece": top_label_ece(probs, labels, n_bins),
        "classwise_ece": None if per_class is None else float(per_class.mean()),
        "classwise_ece_per_class": None if per_class is None else [float(e) for e in per_class],
    }


# --------------------------------------------------------------------------- plugins

Views = Literal["global", "all"]

VIEWS_DOC = (
    "Evaluations to measure: 'global' only the global test set; 'all' also every client's "
    "local test view (one computation per client per evaluation)."
)


def _wanted(views: Views, ctx: EvalContext) -> bool:
    return views == "all" or ctx.client_id is None


class NeuralCollapseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    views: Views = Field("global", description=VIEWS_DOC + " NC1 costs an SVD and a pass over the features.")


class NeuralCollapse(Plugin):
    """Neural collapse (Papyan, Han & Donoho, PNAS 2020) of the evaluated model on its test set.

    Reports NC1 (within-class variability), NC2 (equal norms and simplex-ETF angles of the
    centred class means and of the head rows), NC3 (head aligned with the means) and NC4
    (agreement with the nearest-class-centre classifier); see :func:`neural_collapse` for the
    keys. Under a long tail these show the tail classes' means crowding together (minority
    collapse) before accuracy does.

    One head per report: NC2 and NC3 read the classifier the evaluation scores with (the
    evaluator's ``head``: ``model.head`` followed by every ``eval_logits`` adjustment, e.g. GLA-FR's
    realigned head or CReFF's re-trained one; a cosine head's rows normalised and scaled), and NC4
    compares with the logits that same classifier gave, so all four describe it; the record names
    it (``evaluated_head``). Called without ``head`` (directly, outside an evaluation) they read
    ``model.head.weight`` as stored.
    """

    Params = NeuralCollapseParams
    requires = frozenset({"head"})

    @hookimpl
    def eval_metrics(
        self,
        model: nn.Module,
        features: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        ctx: EvalContext,
        head: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, Any] | None:
        if not _wanted(self.params.views, ctx):
            return None
        if head is None:
            weight, bias = model.head.weight, getattr(model.head, "bias", None)
        else:
            weight, bias = head
        return neural_collapse(features, labels, weight, bias, logits)


class CalibrationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_bins: int = Field(15, ge=1, description="Equal-width probability bins of every ECE.")
    views: Views = Field("global", description=VIEWS_DOC)


class Calibration(Plugin):
    """Top-label ECE (Guo et al. 2017) and classwise ECE (Kull et al. 2019) of the softmax.

    The probabilities are the softmax of the logits the evaluation scored, after every
    ``eval_logits`` adjustment, so a post-hoc remedy's effect on calibration shows; masked
    (``-inf``) classes get probability 0. See :func:`calibration_errors` for the keys.
    """

    Params = CalibrationParams

    @hookimpl
    def eval_metrics(
        self,
        model: nn.Module,
        features: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        ctx: EvalContext,
    ) -> dict[str, Any] | None:
        if not _wanted(self.params.views, ctx):
            return None
        probs = torch.softmax(logits.detach().to("cpu", torch.float64), dim=1)
        return calibration_errors(probs, labels, self.params.n_bins)
