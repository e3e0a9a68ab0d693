"""The PCA fit's solvers: the subset and randomized ones agree with the full eigensolver within their
stated tolerances, the randomized one's error bound holds and it never forms the covariance, `auto`
picks by size, and the same sample always gives the same PCA."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dcscale.cluster import pca as pca_mod
from dcscale.cluster.pca import (RANDOMIZED_OVERSAMPLE, apply_pca, choose_solver, fit_pca, randomized_tolerance,
                                 top_eigenpairs)

DIM = 16  # kept components


def _sample(eigenvalues: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    """Rows with the given covariance spectrum in a random orthonormal basis, around a non-zero mean."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    x = (rng.standard_normal((rows, len(eigenvalues))) * np.sqrt(eigenvalues)) @ basis.T + 5.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def gapped() -> np.ndarray:
    """D=256: 16 distinct strong components (40 .. 10), then a tail from 1 down to 0.5."""
    return _sample(np.r_[np.linspace(40, 10, DIM), np.linspace(1.0, 0.5, 256 - DIM)], rows=3000)


@pytest.fixture(scope="module")
def full(gapped):
    return top_eigenpairs(gapped, DIM, "cpu", "full")


def test_subset_solver_equals_the_full_one(gapped, full):
    subset = top_eigenpairs(gapped, DIM, "cpu", "subset")
    assert subset.solver == "subset"
    np.testing.assert_allclose(subset.values, full.values, rtol=1e-5)
    np.testing.assert_allclose(subset.vectors, full.vectors, atol=1e-4)  # signs fixed alike
    np.testing.assert_array_equal(subset.mean, full.mean)


def test_randomized_solver_meets_its_verified_bound(gapped, full):
    rand = top_eigenpairs(gapped, DIM, "cpu", "randomized")
    assert rand.solver == "randomized" and rand.passes >= 2
    assert rand.residual <= randomized_tolerance(len(gapped))
    bound = rand.residual * float(rand.values[0])  # ||C V - V diag(theta)||_2
    # Kahan: every Ritz value within ||R||_2 of an eigenvalue (here its own: the top 16 are far apart)
    assert float((rand.values - full.values).abs().max()) <= bound
    # Davis-Kahan: the kept subspace within ||R||_2 / gap of the true one
    tail_top = float(top_eigenpairs(gapped, DIM + 1, "cpu", "full").values[DIM])
    cosines = torch.linalg.svdvals(full.vectors.T @ rand.vectors)
    sin_max = float((1 - cosines.min() ** 2).clamp_min(0).sqrt())
    assert sin_max <= bound / (float(rand.values[-1]) - tail_top)
    # ... so the PCAs agree: the whitened, L2-normalised rows have the same inner products (what k-means
    # sees) up to the stated tolerance. (Not the same coordinates: a component's sign is that of its
    # largest entry, which another entry may overtake in a vector rotated within the sample's error.)
    z_rand = apply_pca(gapped, fit_pca(gapped, DIM, solver="randomized"))
    z_full = apply_pca(gapped, fit_pca(gapped, DIM, solver="full"))
    assert np.abs(z_rand @ z_rand[:500].T - z_full @ z_full[:500].T).max() < 1e-2


def test_randomized_solver_never_forms_the_covariance(gapped, monkeypatch):
    def refuse(*_args):
        raise AssertionError("the D x D covariance was formed")

    monkeypatch.setattr(pca_mod, "_scatter", refuse)
    monkeypatch.setattr(pca_mod, "_scatter_syrk", refuse)
    assert top_eigenpairs(gapped, DIM, "cpu", "randomized").solver == "randomized"


def test_without_a_spectral_gap_the_randomized_solver_hands_over_to_the_subset_one(caplog):
    flat = np.random.default_rng(1).standard_normal((800, 200)).astype(np.float32)  # isotropic: no gap
    with caplog.at_level(logging.WARNING, logger="dcscale"):
        pairs = top_eigenpairs(flat, 8, "cpu", "randomized")
    assert pairs.solver == "subset"
    assert "did not reach its tolerance" in caplog.text
    np.testing.assert_array_equal(pairs.vectors, top_eigenpairs(flat, 8, "cpu", "subset").vectors)


def test_auto_solver_by_size_and_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_solver(4096, 256, cpu) == "randomized"  # two passes cost less than the covariance
    assert choose_solver(2048, 256, cpu) == "subset"
    assert choose_solver(8 * (64 + RANDOMIZED_OVERSAMPLE), 64, cpu) == "randomized"
    assert choose_solver(4096, 256, cuda) == "full"  # the dense solver is fast on a GPU


@pytest.mark.parametrize("solver", ["full", "subset", "randomized", "auto"])
def test_the_same_sample_gives_the_same_pca(gapped, solver):
    first, again = fit_pca(gapped, DIM, solver=solver), fit_pca(gapped.copy(), DIM, solver=solver)
    np.testing.assert_array_equal(first.matrix, again.matrix)
    np.testing.assert_array_equal(first.mean, again.mean)
    # signs are fixed: the largest entry of every eigenvector (column) is positive
    peaks = first.matrix[np.abs(first.matrix).argmax(axis=0), np.arange(DIM)]
    assert (peaks > 0).all()


def test_unknown_solver_is_refused(gapped):
    with pytest.raises(ValueError, match="expected one of auto, full, subset, randomized"):
        fit_pca(gapped, DIM, solver="lanczos")
