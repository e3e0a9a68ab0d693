"""PCA with whitening + row L2 normalisation, the "reduce" step of a DeepCluster cycle.

The original fits faiss's PCAMatrix(D, d, eigen_power=-0.5) on all N x D features; at D=4096 that
takes minutes on a CPU. Here the PCA is fitted on a row sample, and only the top d eigenpairs of the
sample's covariance C are computed, by one of three solvers (`fit_pca(solver=...)`):

  full        C (float32 products, float64 accumulation) and a dense symmetric eigensolver for all D
              eigenpairs: the reference, and what a GPU runs (well under a second at D=4096).
  subset      C through one BLAS syrk per chunk (half the products of a general matrix product), and
              LAPACK's subset eigensolver (scipy's eigh(subset_by_index)), which computes only the top
              d eigenpairs: equal to `full` to within float rounding.
  randomized  never forms C: block subspace iteration on the sample (Halko, Martinsson and Tropp
              2011, algorithm 4.4) with a Rayleigh-Ritz step after every pass. It stops once the
              residual R = C V - V diag(theta) of the kept pairs has ||R||_2 <= tol(S) * theta_1, a
              bound computed, not assumed: (V, theta) are then exact eigenpairs of C' = C - R V^T -
              V R^T, a covariance within ||R||_2 of the sample's; every theta_i lies within ||R e_i||
              of an eigenvalue of C (Kahan), and the kept subspace is within an angle of
              asin(||R||_2 / (theta_d - lambda_{d+1})) of the top-d one (Davis-Kahan).
              The tolerance is relative to the sample's own error: tol(S) = RANDOMIZED_SAMPLE_ERROR_SHARE
              x sqrt(2 / S). The sample's covariance is off from the population's by at least
              sqrt(2 / S) theta_1 in the same norm (the standard error of its top eigenvalue; more with
              the effective rank), so the solver adds at most half the sample's smallest error: a
              second sample of S rows moves the pairs more than the solver does. Where the spectrum is
              flat around d (ReLU features at D=4096), the tail's pairs converge slowly (the residual
              falls as about 1 / passes) and are not determined by the sample anyway; a fixed 1e-3 (ten
              times below the sample's error at S = 20k) took 8 passes there, then an exact re-solve.
              One pass costs 4 S D l flops (l = d + RANDOMIZED_OVERSAMPLE) against S D^2 for forming C,
              and no D x D eigensolver runs. The result of `subset` is used when it has not converged
              in RANDOMIZED_MAX_PASSES passes (a large sample asks for a precision the passes do not
              reach: at most about twice the subset solver's time).

`auto` picks `full` on a GPU; on a CPU `randomized` when two of its passes cost less than forming C
(D >= 8 l: D=4096 -> 256), `subset` otherwise. Every solver fixes the eigenvectors' signs (the largest
entry of each is positive) and the randomized one starts from a fixed seed, so the same sample gives
the same PCA. The whitening then scales component i by eigenvalue_i ** eigen_power, as the original.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

log = logging.getLogger("dcscale")

CHUNK_ROWS = 2048  # rows per matmul: a chunk stays in the CPU cache (32 MB at D=4096): 2.5x faster than 16k
SOLVERS = ("auto", "full", "subset", "randomized")
RANDOMIZED_SAMPLE_ERROR_SHARE = 0.5  # the solver's error bound: this share of the sample's, sqrt(2 / S) theta_1
RANDOMIZED_OVERSAMPLE = 16  # subspace columns beyond d: the d-th pair converges at rate lambda_{l+1}/lambda_d
RANDOMIZED_MAX_PASSES = 8  # not converged by then (no spectral gap near d): the subset solver takes over
_RANDOMIZED_SEED = 0x9CA  # the random start is fixed: the same sample gives the same PCA


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


@dataclass
class Eigenpairs:
    """The top eigenpairs of a sample's covariance."""

    mean: np.ndarray  # [D] float32: the sample's mean
    values: torch.Tensor  # [d] float64, largest first
    vectors: torch.Tensor  # [D, d] float64 orthonormal columns, the largest entry of each positive
    solver: str  # the solver that computed them (`auto` resolved)
    passes: int = 0  # randomized: passes over the sample
    residual: float = 0.0  # randomized: ||C V - V diag(values)||_2 / values[0] (the verified bound)


def sample_row_indices(n_total: int, sample_size: int | None, seed: int) -> np.ndarray | None:
    """Sorted global row indices of a uniform sample (without replacement) for fitting the PCA;
    None when all rows are to be used (sample_size None or >= n_total). Same result on every rank."""
    if sample_size is None or sample_size >= n_total:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=sample_size, replace=False))


def fit_pca(sample: np.ndarray, dim: int | None, eigen_power: float = -0.5,
            device: str | torch.device | None = None, solver: str = "auto") -> PCA | None:
    """Fit a whitening PCA to `sample` [S, D] (float32). None when dim is None (PCA off).
    device: where the products and the eigensolver run (default: CUDA when available).
    solver: one of SOLVERS (see the module's docstring)."""
    if dim is None:
        return None
    pairs = top_eigenpairs(sample, dim, device, solver)
    return PCA(mean=pairs.mean, matrix=_whitening(pairs, eigen_power))


def fit_pca_across_ranks(local_sample: np.ndarray, dim: int, eigen_power: float = -0.5,
                         device: str | torch.device | None = None, solver: str = "auto") -> PCA:
    """`fit_pca` on the union of every rank's `local_sample` rows [S_r, D] (a collective: every rank
    calls it; a rank's share may be empty, shape (0, D)). No row crosses the network: each rank
    reduces its share to float64 sums (the mean's, then the covariance's or, for the randomized
    solver, C @ basis once per pass), one all-reduce each; the eigensolver runs once, on rank 0, and
    the D x d result is broadcast. The same on every rank, and deterministic for a given world size:
    one process gives exactly `fit_pca`'s result; more ranks sum the same products in another order
    (a float64 rounding)."""
    from dcscale import dist

    pairs = top_eigenpairs(local_sample, dim, device, solver, across_ranks=True)
    mean, matrix = (pairs.mean, _whitening(pairs, eigen_power)) if pairs is not None else (None, None)
    return PCA(mean=dist.broadcast_array(mean), matrix=dist.broadcast_array(matrix))


def _whitening(pairs: Eigenpairs, eigen_power: float) -> np.ndarray:
    """[D, d] float32: the eigenvectors scaled by eigenvalue ** eigen_power."""
    # Rank-deficient samples (dead units, S < D) have ~0 eigenvalues: floor them so whitening
    # stays finite instead of producing inf/NaN.
    floor = max(float(pairs.values[0]), 1e-30) * 1e-10
    scale = pairs.values.clamp_min(floor) ** eigen_power
    return np.ascontiguousarray((pairs.vectors * scale).float().cpu().numpy())


def top_eigenpairs(sample: np.ndarray, dim: int, device: str | torch.device | None = None,
                   solver: str = "auto", across_ranks: bool = False) -> Eigenpairs | None:
    """The sample's mean and the top `dim` eigenpairs of its covariance, in float32 products.

    across_ranks: `sample` is this rank's share of the sample (a collective, see
    `fit_pca_across_ranks`); the result is rank 0's, None on the other ranks."""
    x = np.ascontiguousarray(sample, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"PCA needs a 2-D sample, got shape {x.shape}")
    summed = _over_ranks if across_ranks else _this_process
    # numpy accumulates in float64 through a small buffer; torch's mean(dtype=float64) would first
    # copy the whole sample to float64 (twice its size). (The row count rides along, exact in float64.)
    totals = summed(np.concatenate(([float(x.shape[0])], x.sum(axis=0, dtype=np.float64))))
    n, d_in = int(totals[0]), x.shape[1]
    if n < 2:
        raise ValueError(f"PCA needs a sample of at least 2 rows, got {n}")
    if not 1 <= dim <= d_in:
        raise ValueError(f"cluster.pca_dim = {dim} must be between 1 and the feature dimension {d_in}")
    if solver not in SOLVERS:
        raise ValueError(f"PCA solver {solver!r}: expected one of {', '.join(SOLVERS)}")
    mean = (totals[1:] / n).astype(np.float32)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if solver == "auto":
        solver = choose_solver(d_in, dim, device)
    main = not across_ranks or _is_main()
    if solver == "randomized":
        found = _randomized(x, mean, n, dim, device, across_ranks)
        if found is not None:
            return found if main else None
        if main:
            log.warning("randomized PCA (%d -> %d) did not reach its tolerance in %d passes (no spectral gap "
                        "near component %d); using the subset solver", d_in, dim, RANDOMIZED_MAX_PASSES, dim)
        solver = "subset"
    if solver == "subset" and device.type == "cpu":
        cov = summed(_scatter_syrk(x, mean))
        if not main:
            return None
        cov /= n
        values, vectors = _subset_eigh(cov, dim)
    else:  # full, or subset on a GPU (no subset solver there; the full one is fast)
        cov = _scatter(x, mean, device)
        if across_ranks:
            cov = torch.from_numpy(summed(cov.cpu().numpy())).to(device)
        if not main:
            return None
        values, vectors = _full_eigh(cov / n, dim)
    return Eigenpairs(mean, values, _fixed_signs(vectors), solver)


def _this_process(sums: np.ndarray) -> np.ndarray:
    return sums


def _over_ranks(sums: np.ndarray) -> np.ndarray:
    """Every rank's float64 `sums` added up, on every rank (one all-reduce)."""
    from dcscale import dist

    return dist.all_reduce_array_(np.ascontiguousarray(sums))


def _is_main() -> bool:
    from dcscale import dist

    return dist.is_main()


def _from_main(value, across_ranks: bool):
    """Rank 0's `value` (a float32 tensor, or a small picklable object) on every rank."""
    if not across_ranks:
        return value
    from dcscale import dist

    if isinstance(value, torch.Tensor) or value is None:
        device = value.device if value is not None else None
        shared = dist.broadcast_array(value.cpu().numpy() if value is not None else None)
        return torch.from_numpy(shared).to(device) if device is not None else torch.from_numpy(shared)
    return dist.broadcast_object(value)


def choose_solver(in_dim: int, dim: int, device: torch.device) -> str:
    """The solver `auto` stands for (see the module's docstring)."""
    if device.type != "cpu":
        return "full"
    return "randomized" if in_dim >= 8 * (dim + RANDOMIZED_OVERSAMPLE) else "subset"


def _eig_dtype(d_in: int):
    # float64 is exact enough for whitening the smallest kept components; above 2048 dims the
    # float32 solver is ~2x faster and still accurate to ~1e-6 of the top eigenvalue.
    return torch.float64 if d_in <= 2048 else torch.float32


def _scatter(x: np.ndarray, mean: np.ndarray, device: torch.device) -> torch.Tensor:
    """The centred rows' scatter sum_i c_i c_i^T [D, D] float64 on `device` (n C): float32 products,
    chunk by chunk, accumulated in float64."""
    n, d_in = x.shape
    xt, mean32 = _tensor(x), torch.from_numpy(mean).to(device)
    cov = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
    for lo in range(0, n, CHUNK_ROWS):
        c = xt[lo:lo + CHUNK_ROWS].to(device) - mean32
        cov += (c.T @ c).double()
    return cov


def _scatter_syrk(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The scatter [D, D] float64 as `_scatter`, on the CPU: numpy computes c.T @ c with one BLAS
    syrk (only one triangle), twice as fast as torch's general product."""
    n, d_in = x.shape
    cov = np.zeros((d_in, d_in), np.float64)
    for lo in range(0, n, CHUNK_ROWS):
        c = x[lo:lo + CHUNK_ROWS] - mean
        cov += c.T @ c
    return cov


def _full_eigh(cov: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(cov.to(_eig_dtype(cov.shape[0])))  # ascending
    return values.flip(0)[:dim].double(), vectors.flip(1)[:, :dim].double()


def _subset_eigh(cov: np.ndarray, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    d_in = cov.shape[0]
    a = cov.astype(np.float64 if _eig_dtype(d_in) == torch.float64 else np.float32, copy=False)
    # One BLAS thread: the reduction to tridiagonal form is memory-bound (matrix-vector products) and
    # gains little from threads, while OpenBLAS's spinning threads ran it 3x slower on shared cores.
    with threadpool_limits(limits=1, user_api="blas"):
        values, vectors = scipy.linalg.eigh(a, subset_by_index=[d_in - dim, d_in - 1], driver="evr",
                                            overwrite_a=True, check_finite=False)  # ascending
    return (torch.from_numpy(values[::-1].copy()).double(),
            torch.from_numpy(vectors[:, ::-1].copy()).double())


def _scatter_times(x: np.ndarray, mean: np.ndarray, basis: torch.Tensor) -> torch.Tensor:
    """(n C) @ basis [D, l] float64, through the sample (C is never formed): two float32 products per
    chunk of centred rows, accumulated in float64."""
    n = x.shape[0]
    xt, mean32 = _tensor(x), torch.from_numpy(mean).to(basis.device)
    out = torch.zeros(basis.shape, dtype=torch.float64, device=basis.device)
    for lo in range(0, n, CHUNK_ROWS):
        c = xt[lo:lo + CHUNK_ROWS].to(basis.device) - mean32
        out += (c.T @ (c @ basis)).double()
    return out


def _randomized(x: np.ndarray, mean: np.ndarray, n: int, dim: int, device: torch.device,
                across_ranks: bool = False) -> Eigenpairs | None:
    """Block subspace iteration with Rayleigh-Ritz (see the module's docstring); None when it has not
    converged within RANDOMIZED_MAX_PASSES passes. Across ranks, every pass all-reduces the products
    C @ basis; rank 0 alone runs the small dense steps and broadcasts the next basis (the returned
    pairs are rank 0's: the other ranks get a placeholder with no values)."""
    d_in = x.shape[1]
    width = min(d_in, dim + RANDOMIZED_OVERSAMPLE)
    main = not across_ranks or _is_main()
    start = torch.randn(d_in, width, generator=torch.Generator().manual_seed(_RANDOMIZED_SEED))
    basis = _from_main(torch.linalg.qr(start.to(device)).Q if main else None, across_ranks).to(device)
    for passes in range(1, RANDOMIZED_MAX_PASSES + 1):
        image = _scatter_times(x, mean, basis)
        if across_ranks:
            image = torch.from_numpy(_over_ranks(image.cpu().numpy())).to(device)
        image = image / n
        found = None
        if main and passes > 1:  # (the first basis is random: nothing to extract from it yet)
            values, vectors, residual = _rayleigh_ritz(basis.double(), image, dim)
            if residual <= randomized_tolerance(n) * float(values[0]):
                found = Eigenpairs(mean, values, _fixed_signs(vectors), "randomized", passes,
                                   residual / max(float(values[0]), 1e-30))
        if _from_main(found is not None, across_ranks):
            return found if main else Eigenpairs(mean, torch.zeros(0), torch.zeros(0), "randomized", passes)
        basis = _from_main(torch.linalg.qr(image.float()).Q if main else None, across_ranks).to(device)
    return None


def randomized_tolerance(sample_rows: int) -> float:
    """The randomized solver's bound on ||C V - V diag(theta)||_2 / theta_1 for a sample of this many
    rows: half the relative standard error of the sample's top eigenvalue (see the module's docstring)."""
    return RANDOMIZED_SAMPLE_ERROR_SHARE * math.sqrt(2.0 / sample_rows)


def _rayleigh_ritz(basis: torch.Tensor, image: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The top `dim` Ritz pairs of C on span(basis) (orthonormal columns), given image = C @ basis,
    and the 2-norm of their residual C V - V diag(values)."""
    small = basis.T @ image
    values, rotation = torch.linalg.eigh((small + small.T) / 2)  # ascending
    values, rotation = values.flip(0)[:dim], rotation.flip(1)[:, :dim]
    vectors = basis @ rotation
    residual = image @ rotation - vectors * values
    # ||R||_2 from the small Gram matrix R^T R: ten times faster than an SVD of R, and exact enough
    return values, vectors, float(torch.linalg.eigvalsh(residual.T @ residual)[-1].clamp_min(0).sqrt())


def _fixed_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Each column times the sign of its largest-magnitude entry: eigenvectors are defined up to a
    sign, which solvers (and thread counts) choose differently."""
    peak = vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True))
    return vectors * torch.where(peak < 0, -1.0, 1.0).to(vectors.dtype)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in place when x is float32 (all-zero rows stay zero). Chunk by
    chunk, so the squares behind the norms never take more than one chunk's memory."""
    x = np.asarray(x, dtype=np.float32)
    for lo in range(0, x.shape[0], CHUNK_ROWS):
        chunk = x[lo:lo + CHUNK_ROWS]
        norms = np.linalg.norm(chunk, axis=1, keepdims=True)
        np.maximum(norms, 1e-12, out=norms)
        chunk /= norms
    return x


def apply_pca(x: np.ndarray, pca: PCA | None, out: np.ndarray | None = None) -> np.ndarray:
    """Project rows with `pca` (when given) and L2-normalise them. Returns new float32 [n, d] rows
    (or fills `out`, float32 [n, d] C-contiguous, and returns it).

    One chunk at a time, straight into the result: float16 features are upcast a chunk at a time,
    so the only memory besides `x` and the result is a few chunks' worth.
    """
    out_dim = x.shape[1] if pca is None else pca.out_dim
    if pca is not None and x.shape[1] != pca.in_dim:
        raise ValueError(f"features have {x.shape[1]} dims, the PCA expects {pca.in_dim}")
    if out is None:
        out = np.empty((x.shape[0], out_dim), dtype=np.float32)
    elif out.shape != (x.shape[0], out_dim) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {(x.shape[0], out_dim)}, got {out.dtype} {out.shape}")
    if pca is not None:
        mean, matrix = torch.from_numpy(pca.mean), torch.from_numpy(pca.matrix)
    for lo in range(0, x.shape[0], CHUNK_ROWS):
        rows = out[lo:lo + CHUNK_ROWS]
        if pca is None:
            rows[...] = x[lo:lo + CHUNK_ROWS]
        else:
            # float16 - float32 computes in float32: the upcast chunk is this subtraction's result
            centred = torch.sub(_tensor(x[lo:lo + CHUNK_ROWS]), mean).float()
            torch.matmul(centred, matrix, out=torch.from_numpy(rows))
        l2_normalize(rows)
    return out
