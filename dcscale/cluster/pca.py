"""PCA with whitening + row L2 normalisation, the "reduce" step of a DeepCluster cycle.

The original fits faiss's PCAMatrix(D, d, eigen_power=-0.5) on all N x D features; at D=4096 that
takes minutes on a CPU. Here the D x D covariance of a row sample is accumulated with one sgemm per
chunk (float32 products, float64 accumulation) and decomposed with a dense symmetric eigensolver;
the same whitening follows (component i scaled by eigenvalue_i ** eigen_power).
"""

from __future__ import annotations

from dataclasses import dataclass

import warnings

import numpy as np
import torch

_CHUNK_ROWS = 16384  # rows per matmul: bounds temporaries (256 MB at D=4096)


def _tensor(x: np.ndarray) -> torch.Tensor:
    """Zero-copy view; read-only inputs (memory-mapped features) are fine since nothing writes to them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(x)


@dataclass
class PCA:
    mean: np.ndarray  # [D] float32, subtracted before projection
    matrix: np.ndarray  # [D, d] float32: eigenvectors (largest first) times eigenvalue ** eigen_power

    @property
    def in_dim(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.matrix.shape[1])


def sample_row_indices(n_total: int, sample_size: int | None, seed: int) -> np.ndarray | None:
    """Sorted global row indices of a uniform sample (without replacement) for fitting the PCA;
    None when all rows are to be used (sample_size None or >= n_total). Same result on every rank."""
    if sample_size is None or sample_size >= n_total:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=sample_size, replace=False))


def fit_pca(sample: np.ndarray, dim: int | None, eigen_power: float = -0.5,
            device: str | torch.device | None = None) -> PCA | None:
    """Fit a whitening PCA to `sample` [S, D] (float32). None when dim is None (PCA off).
    device: where the covariance and eigendecomposition run (default: CUDA when available, where
    D=4096 takes well under a second; on CPU it is a few seconds per 20k sample rows)."""
    if dim is None:
        return None
    x = np.ascontiguousarray(sample, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs a 2-D sample with at least 2 rows, got shape {x.shape}")
    n, d_in = x.shape
    if not 1 <= dim <= d_in:
        raise ValueError(f"cluster.pca_dim = {dim} must be between 1 and the feature dimension {d_in}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    xt = _tensor(x)
    # numpy accumulates in float64 through a small buffer; torch's mean(dtype=float64) would first
    # copy the whole sample to float64 (twice its size)
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    cov = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
    mean32 = torch.from_numpy(mean).to(device)
    for lo in range(0, n, _CHUNK_ROWS):
        c = xt[lo:lo + _CHUNK_ROWS].to(device) - mean32
        cov += (c.T @ c).double()
    cov /= n
    # float64 eigh is exact enough for whitening the smallest kept components; above 2048 dims the
    # float32 solver is ~2x faster and still accurate to ~1e-6 of the top eigenvalue.
    eig_dtype = torch.float64 if d_in <= 2048 else torch.float32
    evals, evecs = torch.linalg.eigh(cov.to(eig_dtype))  # ascending
    evals = evals.flip(0)[:dim].double()
    evecs = evecs.flip(1)[:, :dim].double()
    # Rank-deficient samples (dead units, S < D) have ~0 eigenvalues: floor them so whitening
    # stays finite instead of producing inf/NaN.
    floor = max(float(evals[0]), 1e-30) * 1e-10
    scale = evals.clamp_min(floor) ** eigen_power
    matrix = (evecs * scale).float().cpu().numpy()
    return PCA(mean=mean, matrix=np.ascontiguousarray(matrix))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in place when x is float32 (all-zero rows stay zero). Chunk by
    chunk, so the squares behind the norms never take more than one chunk's memory."""
    x = np.asarray(x, dtype=np.float32)
    for lo in range(0, x.shape[0], _CHUNK_ROWS):
        chunk = x[lo:lo + _CHUNK_ROWS]
        norms = np.linalg.norm(chunk, axis=1, keepdims=True)
        np.maximum(norms, 1e-12, out=norms)
        chunk /= norms
    return x


def apply_pca(x: np.ndarray, pca: PCA | None) -> np.ndarray:
    """Project rows with `pca` (when given) and L2-normalise them. Returns new float32 [n, d] rows.

    One chunk at a time, straight into the result: float16 features are upcast a chunk at a time,
    so the only memory besides `x` and the result is a few chunks' worth.
    """
    out_dim = x.shape[1] if pca is None else pca.out_dim
    if pca is not None and x.shape[1] != pca.in_dim:
        raise ValueError(f"features have {x.shape[1]} dims, the PCA expects {pca.in_dim}")
    out = np.empty((x.shape[0], out_dim), dtype=np.float32)
    if pca is not None:
        mean, matrix = torch.from_numpy(pca.mean), torch.from_numpy(pca.matrix)
    for lo in range(0, x.shape[0], _CHUNK_ROWS):
        rows = out[lo:lo + _CHUNK_ROWS]
        if pca is None:
            rows[...] = x[lo:lo + _CHUNK_ROWS]
        else:
            # float16 - float32 computes in float32: the upcast chunk is this subtraction's result
            centred = torch.sub(_tensor(x[lo:lo + _CHUNK_ROWS]), mean).float()
            torch.matmul(centred, matrix, out=torch.from_numpy(rows))
        l2_normalize(rows)
    return out
