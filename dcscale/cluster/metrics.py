"""Clustering metrics: NMI (scikit-learn's), Initial Alignment, cluster-size statistics."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import normalized_mutual_info_score


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information between two labelings (scikit-learn, arithmetic mean
    normalisation). Entries where either labeling is -1 (no label) are ignored; NaN if none is left."""
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in length: {a.shape[0]} vs {b.shape[0]}")
    keep = (a != -1) & (b != -1)
    if not keep.any():
        return float("nan")
    return float(normalized_mutual_info_score(a[keep], b[keep]))


def initial_alignment(ground_truth: np.ndarray, pseudo_labels: np.ndarray) -> float:
    """The Deep Dive paper's Initial Alignment: NMI(ground truth, pseudo-labels of the randomly
    initialised network)."""
    return nmi(ground_truth, pseudo_labels)


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
