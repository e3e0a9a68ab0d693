"""Clustering metrics: NMI (both normalisations, scikit-learn's formulas), Initial Alignment,
cluster-size statistics.

NMI = MI(a, b) / mean(H(a), H(b)). Which mean differs between the two papers' environments:
'arithmetic' is scikit-learn's default since 0.22 (the Deep Dive's), 'geometric' was the default up
to 0.20 (the original DeepCluster's). The geometric mean of two entropies is at most their arithmetic
mean, so the geometric NMI is the higher one, by the ratio of the two means: little when the
labelings have similar entropies (K close to the number of classes), more the further apart they are.
"""

from __future__ import annotations

from math import log

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import mutual_info_score

NMI_AVERAGES = ("arithmetic", "geometric")


def _entropy(counts: np.ndarray) -> float:
    """Entropy (nats) of a labeling from its class counts, as scikit-learn's `_entropy`."""
    counts = counts[counts > 0].astype(np.float64)
    if counts.size <= 1:
        return 0.0
    total = counts.sum()
    return float(-np.sum((counts / total) * (np.log(counts) - log(total))))


def nmi_scores(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """NMI between two integer labelings under both normalisations, {'arithmetic', 'geometric'},
    from one contingency table (one pass over the labels, however many averages are wanted).

    Entries where either labeling is -1 (no label) are ignored; NaN if none is left. Equal to
    scikit-learn's normalized_mutual_info_score(a, b, average_method=...) for each average.
    """
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in length: {a.shape[0]} vs {b.shape[0]}")
    if a.size and not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)):
        raise ValueError(f"NMI needs integer labels, got {a.dtype} and {b.dtype}")
    keep = (a != -1) & (b != -1)
    if not keep.any():
        return {name: float("nan") for name in NMI_AVERAGES}
    a, b = a[keep].astype(np.int64), b[keep].astype(np.int64)
    a -= a.min()  # non-negative, so that one int64 code a * width + b names each (a, b) pair
    b -= b.min()
    if (int(a.max()) + 1) * (int(b.max()) + 1) >= 2 ** 62:  # sparse huge ids: number them 0.. first
        a, b = np.unique(a, return_inverse=True)[1], np.unique(b, return_inverse=True)[1]
    width = int(b.max()) + 1
    pairs, counts = np.unique(a * width + b, return_counts=True)
    rows, cols = np.divmod(pairs, width)
    rows, cols = np.unique(rows, return_inverse=True)[1], np.unique(cols, return_inverse=True)[1]
    contingency = sp.coo_matrix((counts, (rows, cols)), shape=(rows.max() + 1, cols.max() + 1))
    h_a = _entropy(np.bincount(rows, weights=counts))
    h_b = _entropy(np.bincount(cols, weights=counts))
    if contingency.shape[0] == contingency.shape[1] == 1:
        return {name: 1.0 for name in NMI_AVERAGES}  # neither labeling splits the data: a perfect match
    mi = mutual_info_score(None, None, contingency=contingency)
    if mi == 0:
        return {name: 0.0 for name in NMI_AVERAGES}
    return {"arithmetic": float(mi / np.mean([h_a, h_b])), "geometric": float(mi / np.sqrt(h_a * h_b))}


def nmi(a: np.ndarray, b: np.ndarray, average: str = "arithmetic") -> float:
    """Normalised mutual information between two labelings, `average` in NMI_AVERAGES
    ('arithmetic': scikit-learn's default; 'geometric': the original DeepCluster's). Entries where
    either labeling is -1 (no label) are ignored; NaN if none is left."""
    if average not in NMI_AVERAGES:
        raise ValueError(f"NMI average {average!r}: expected one of {', '.join(NMI_AVERAGES)}")
    return nmi_scores(a, b)[average]


def initial_alignment(ground_truth: np.ndarray, pseudo_labels: np.ndarray, average: str = "arithmetic") -> float:
    """The Deep Dive paper's Initial Alignment: NMI(ground truth, pseudo-labels of the randomly
    initialised network)."""
    return nmi(ground_truth, pseudo_labels, average)


def cluster_stats(labels: np.ndarray, k: int) -> dict:
    """Sizes of clusters 0..k-1 (label -1 ignored): empty/nonempty counts, min/median/max over the
    non-empty ones, and the full size array."""
    labels = np.asarray(labels).ravel()
    valid = labels[labels >= 0]
    if valid.size and valid.max() >= k:
        raise ValueError(f"label {int(valid.max())} out of range for k={k}")
    sizes = np.bincount(valid.astype(np.int64), minlength=k)
    nonempty = sizes[sizes > 0]
    return {
        "empty": int(k - nonempty.size),
        "nonempty": int(nonempty.size),
        "min": int(nonempty.min()) if nonempty.size else 0,
        "median": float(np.median(nonempty)) if nonempty.size else 0.0,
        "max": int(nonempty.max()) if nonempty.size else 0,
        "sizes": sizes,
    }
