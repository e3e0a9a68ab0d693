#!/usr/bin/env python
"""Benchmark dcscale's clustering step (PCA + faiss k-means + assignment) against scikit-learn and
against the original DeepCluster's settings, exact k-means (max_points_per_centroid: null) against
subsampled training, and the PCA fit's solvers against each other and faiss's PCAMatrix.

    python tools/bench_cluster.py --n 100000 --dim 256 --k 1000
    python tools/bench_cluster.py --n 50000 --dim 4096 --pca-dim 256 --k 1000 --original --no-sklearn
    python tools/bench_cluster.py --pca-fit-dims 2048,4096 --pca-dim 256 --pca-sample 20000

Data: synthetic "network features" (a mixture of 2K Gaussian clusters of different widths in a
64-d latent space, mapped linearly to D dims, plus isotropic noise), so that k-means has structure
to find. Timed steps, all on the same rows:
  ours:        [PCA fit on --pca-sample rows + projection of all rows] + L2, then exact faiss
               k-means (--niter iterations) and assignment of every row.
  exact:       faiss k-means on all rows + assignment (the k-means part of `ours`).
  subsampled:  faiss k-means on k * --max-points-per-centroid rows + assignment of every row.
  sklearn:     sklearn PCA(whiten=True) on the raw rows + L2 (only with --pca-dim), then
               sklearn KMeans(k, n_init=1, max_iter=niter, tol=0, k-means++ init: its default)
               on *our* reduced rows so that its objective is on the same footing.
Objectives are all the same measure: mean squared distance of every row to its assigned centroid
(after the final assignment). If sklearn would take too long, --sklearn-iter-cap runs its k-means
for fewer iterations and extrapolates linearly per iteration (its k-means++ init is timed
separately and not extrapolated); the output then says `sklearn_extrapolated: true`.
  original:    (--original) the original DeepCluster's reduce step: faiss PCAMatrix(D, d, -0.5)
               trained on all rows, applied to all rows, L2; then the same k-means and assignment
               as `ours`. NMI against the mixture component each row was drawn from, and objective,
               for both.
  PCA fit:     (--pca-fit-dims D1,D2,...: only this) the fit on --pca-sample rows at each D by every
               solver of dcscale.cluster.pca (full: the previous one, dense eigensolver) and by faiss's
               PCAMatrix, with each one's eigenvalue error against `full`, its share of the top-d
               variance `full` captures, and the leading eigenvectors it agrees on (cosine > 0.99).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def synthetic_features(n: int, dim: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 rows [n, dim], the mixture component each row was drawn from [n])."""
    rng = np.random.default_rng(seed)
    latent = 64
    centers = rng.standard_normal((2 * k, latent)).astype(np.float32) * 2
    widths = rng.uniform(0.3, 1.5, 2 * k).astype(np.float32)
    which = rng.integers(0, 2 * k, n)
    z = centers[which] + widths[which, None] * rng.standard_normal((n, latent), dtype=np.float32)
    mix = rng.standard_normal((latent, dim), dtype=np.float32) / np.float32(np.sqrt(latent))
    x = z @ mix
    x += 0.3 * rng.standard_normal((n, dim), dtype=np.float32)
    return x, which


def relu_features(n: int, dim: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """ReLU features of a random wide layer on the same mixture (64-d rows of `synthetic_features`):
    relu(x A + b), A [64, dim]. Their covariance spectrum decays smoothly, with no gap near a PCA's d
    (the case where the randomized PCA solver converges slowly)."""
    x, which = synthetic_features(n, 64, k, seed)
    rng = np.random.default_rng(seed + 1)
    a = rng.standard_normal((64, dim), dtype=np.float32) / np.float32(8)
    b = rng.standard_normal(dim, dtype=np.float32) * np.float32(0.5)
    out = x @ a
    out += b
    return np.maximum(out, 0, out=out), which


def objective_in(z: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared distance of every row of z to the mean of its cluster: the k-means objective of a
    labelling in the space z, to compare labellings found in different spaces."""
    k = int(labels.max()) + 1
    sums = np.zeros((k, z.shape[1]), np.float64)
    np.add.at(sums, labels, z)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    means = sums / np.maximum(counts, 1)[:, None]
    return float(((z - means[labels]) ** 2).sum(axis=1).mean())


REPEAT = 1  # set from --repeat: every timed step runs this many times and reports its fastest run


def timed(fn, *args, **kwargs):
    best = float("inf")
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return out, best


def run_ours(x, args):
    from dcscale.cluster import apply_pca, fit_pca, sample_row_indices

    def reduce():
        pca = None
        if args.pca_dim is not None:
            rows = sample_row_indices(x.shape[0], args.pca_sample, args.seed)
            pca = fit_pca(x if rows is None else x[rows], args.pca_dim, solver=args.pca_solver)
        return apply_pca(x, pca)

    return timed(reduce)


def run_kmeans(z, args, max_points_per_centroid):
    """((objective, non-empty clusters, labels), seconds) of k-means + assignment of every row."""
    from dcscale.cluster import assign, train_kmeans, training_row_indices

    def cluster():
        rows = training_row_indices(z.shape[0], args.k, max_points_per_centroid, args.seed)
        km = train_kmeans(z if rows is None else z[rows], args.k, args.niter, args.seed)
        labels, dists = assign(z, km.centroids)
        return float(dists.mean(dtype=np.float64)), int(np.unique(labels).size), labels

    return timed(cluster)


def run_original(x, args):
    """The original DeepCluster's reduce step (faiss PCAMatrix on all rows, applied to all rows, L2),
    timed; the k-means after it is `run_kmeans`, as ours."""
    import faiss

    from dcscale.cluster import l2_normalize

    def reduce():
        mat = faiss.PCAMatrix(x.shape[1], args.pca_dim, -0.5)
        mat.train(x)
        return l2_normalize(mat.apply_py(x))

    return timed(reduce)


def compare_pca_fits(dim: int, args) -> dict:
    """Every solver's fit (and faiss PCAMatrix's) on the same --pca-sample rows at dimension `dim`."""
    import faiss
    import torch

    from dcscale.cluster.pca import top_eigenpairs

    x, _ = synthetic_features(args.pca_sample, dim, args.k, args.seed)
    d = args.pca_dim
    out = {"dim": dim}
    ref = None
    for solver in ("full", "subset", "randomized"):
        pairs, secs = timed(top_eigenpairs, x, d, "cpu", solver)
        row = {"s": secs, "solver": pairs.solver, "passes": pairs.passes, "residual_bound": pairs.residual}
        if ref is None:
            ref = pairs
        else:
            disagree = ((ref.vectors * pairs.vectors).sum(0).abs() <= 0.99).nonzero()
            row["eig_rel_err_max"] = float(((pairs.values - ref.values).abs() / ref.values).max())
            row["eig_err_max_vs_top"] = float((pairs.values - ref.values).abs().max() / ref.values[0])
            row["captured_variance_ratio"] = float(pairs.values.sum() / ref.values.sum())
            row["leading_vectors_agreeing"] = int(disagree[0]) if len(disagree) else d
        out[solver] = row
    mat = faiss.PCAMatrix(dim, d, -0.5)
    _, secs = timed(mat.train, x)
    # (faiss's eigenvalues are of the scatter matrix X^T X: n times the covariance's)
    values = torch.from_numpy(faiss.vector_to_array(mat.eigenvalues)[:d].astype(np.float64)) / len(x)
    out["faiss"] = {"s": secs, "eig_rel_err_max": float(((values - ref.values).abs() / ref.values).max())}
    out["subset_speedup_vs_full"] = out["full"]["s"] / out["subset"]["s"]
    out["randomized_speedup_vs_full"] = out["full"]["s"] / out["randomized"]["s"]
    return out


def print_pca_fits(rows: list[dict], args) -> None:
    print(f"PCA fit on {args.pca_sample} rows -> {args.pca_dim}, best of {REPEAT}:")
    for r in rows:
        print(f"  D={r['dim']}:")
        for name in ("full", "subset", "randomized", "faiss"):
            m = r[name]
            extra = "" if name == "full" else f"   eig rel err max {m['eig_rel_err_max']:.1e}"
            if "captured_variance_ratio" in m:
                extra += (f", variance x{m['captured_variance_ratio']:.6f}, first {m['leading_vectors_agreeing']} "
                          f"vectors agree")
            if name == "randomized" and m["solver"] == "randomized":
                extra += f", {m['passes']} passes, bound {m['residual_bound']:.1e}"
            elif name == "randomized":
                extra += f" (not converged: fell back to {m['solver']})"
            print(f"    {name:<11} {m['s']:8.2f} s{extra}")
        print(f"    subset {r['subset_speedup_vs_full']:.1f}x, randomized {r['randomized_speedup_vs_full']:.1f}x "
              f"faster than full")


def run_sklearn(x, z, args):
    from sklearn.cluster import KMeans, kmeans_plusplus
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import normalize

    pca_s = 0.0
    if args.pca_dim is not None:
        def sk_reduce():
            return normalize(PCA(n_components=args.pca_dim, whiten=True, random_state=args.seed).fit_transform(x))
        _, pca_s = timed(sk_reduce)
    iters = min(args.niter, args.sklearn_iter_cap or args.niter)
    (init, _), init_s = timed(kmeans_plusplus, z, args.k, random_state=args.seed)
    km = KMeans(n_clusters=args.k, init=init, n_init=1, max_iter=iters, tol=0.0, random_state=args.seed)
    _, fit_s = timed(km.fit, z)
    kmeans_s = init_s + fit_s * (args.niter / km.n_iter_)
    return {"sklearn_s": pca_s + kmeans_s, "sklearn_pca_s": pca_s, "sklearn_kmeans_s": kmeans_s,
            "sklearn_init_s": init_s, "sklearn_iterations_run": int(km.n_iter_),
            "sklearn_extrapolated": km.n_iter_ < args.niter,
            "sklearn_objective": float(km.inertia_) / z.shape[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000, help="rows (images)")
    p.add_argument("--dim", type=int, default=256, help="feature dimension D")
    p.add_argument("--k", type=int, default=500, help="clusters")
    p.add_argument("--pca-dim", type=int, default=None, help="PCA output dims (timed with the rest); default off")
    p.add_argument("--pca-sample", type=int, default=20_000, help="rows the PCA is fitted on")
    p.add_argument("--pca-solver", default="auto", choices=["auto", "full", "subset", "randomized"],
                   help="the PCA fit's solver in `ours` (dcscale.cluster.pca)")
    p.add_argument("--original", action="store_true",
                   help="also run the original DeepCluster's settings (faiss PCAMatrix on all rows; needs --pca-dim)")
    p.add_argument("--pca-fit-dims", default=None,
                   help="only compare the PCA fit's solvers at these dimensions, e.g. 2048,4096 (--pca-dim: 256)")
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--max-points-per-centroid", type=int, default=50, help="for the subsampled run")
    p.add_argument("--sklearn-iter-cap", type=int, default=None,
                   help="run sklearn's k-means for at most this many iterations and extrapolate")
    p.add_argument("--no-sklearn", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="faiss/BLAS threads (default: all cores)")
    p.add_argument("--repeat", type=int, default=1, help="run every timed step this many times, keep the fastest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", choices=("mixture", "relu"), default="mixture",
                   help="mixture: a Gaussian mixture mapped linearly to D dims plus noise; relu: ReLU of a random "
                        "wide layer on it (no spectral gap near --pca-dim)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    global REPEAT
    REPEAT = max(1, args.repeat)
    load_before = os.getloadavg()[0]
    import faiss
    import torch
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)

    if args.pca_fit_dims:
        args.pca_dim = args.pca_dim or 256
        rows = [compare_pca_fits(int(d), args) for d in args.pca_fit_dims.split(",")]
        result = {"pca_fit": rows, "pca_sample": args.pca_sample, "pca_dim": args.pca_dim, "repeat": REPEAT,
                  "threads": torch.get_num_threads(), "loadavg_1min_before": load_before,
                  "loadavg_1min_after": os.getloadavg()[0]}
        if args.json:
            print(json.dumps(result))
        else:
            print_pca_fits(rows, args)
        return 0
    if args.original and args.pca_dim is None:
        p.error("--original needs --pca-dim")

    from dcscale.cluster import nmi

    make = relu_features if args.features == "relu" else synthetic_features
    x, truth = make(args.n, args.dim, args.k, args.seed)
    z, pca_s = run_ours(x, args)
    (exact_obj, exact_used, exact_labels), exact_s = run_kmeans(z, args, None)
    (sub_obj, sub_used, _), sub_s = run_kmeans(z, args, args.max_points_per_centroid)
    result = {
        "n": args.n, "dim": args.dim, "k": args.k, "pca_dim": args.pca_dim, "features": args.features,
        "pca_sample": args.pca_sample if args.pca_dim else None, "pca_solver": args.pca_solver, "niter": args.niter,
        "max_points_per_centroid": args.max_points_per_centroid,
        "threads": faiss.omp_get_max_threads(), "gpu": faiss.get_num_gpus() > 0, "repeat": REPEAT,
        "loadavg_1min_before": load_before,
        "pca_s": pca_s, "ours_s": pca_s + exact_s, "ours_subsampled_s": pca_s + sub_s,
        "exact_s": exact_s, "subsampled_s": sub_s,
        "exact_objective": exact_obj, "subsampled_objective": sub_obj,
        "exact_nonempty": exact_used, "subsampled_nonempty": sub_used,
        "subsampled_speedup": exact_s / sub_s, "subsampled_objective_ratio": sub_obj / exact_obj,
        "exact_nmi": nmi(truth, exact_labels),
    }
    if args.original:
        z_orig, orig_pca_s = run_original(x, args)
        (orig_obj, _, orig_labels), orig_kmeans_s = run_kmeans(z_orig, args, None)
        result.update({"original_pca_s": orig_pca_s, "original_s": orig_pca_s + orig_kmeans_s,
                       "original_objective": orig_obj, "original_nmi": nmi(truth, orig_labels),
                       "speedup_vs_original": (orig_pca_s + orig_kmeans_s) / (pca_s + exact_s)})
        result["objective_vs_original"] = exact_obj / orig_obj
        # both labellings scored in one space (the original's reduced rows): their objectives compare
        result["common_space_objective"] = objective_in(z_orig, exact_labels)
        result["original_common_space_objective"] = objective_in(z_orig, orig_labels)
        result["nmi_vs_original"] = result["exact_nmi"] / result["original_nmi"]
    result["loadavg_1min_after"] = os.getloadavg()[0]
    if not args.no_sklearn:
        result.update(run_sklearn(x, z, args))
        result["speedup_vs_sklearn"] = result["sklearn_s"] / result["ours_s"]
        result["speedup_vs_sklearn_subsampled"] = result["sklearn_s"] / result["ours_subsampled_s"]
        result["exact_vs_sklearn_objective_ratio"] = exact_obj / result["sklearn_objective"]
    if args.json:
        print(json.dumps(result))
        return 0
    pca = f" -> {args.pca_dim} (PCA on {args.pca_sample} rows)" if args.pca_dim else ""
    print(f"N={args.n} D={args.dim}{pca} K={args.k} niter={args.niter} threads={result['threads']} "
          f"gpu={result['gpu']}")
    rows = [("dcscale exact (PCA + k-means + assign)", result["ours_s"], exact_obj),
            (f"dcscale subsampled ({args.max_points_per_centroid}/centroid)", result["ours_subsampled_s"], sub_obj)]
    if args.original:
        rows.append(("original (PCAMatrix on all rows + k-means)", result["original_s"], result["original_objective"]))
    if "sklearn_s" in result:
        note = " (extrapolated)" if result["sklearn_extrapolated"] else ""
        rows.append((f"scikit-learn PCA + KMeans{note}", result["sklearn_s"], result["sklearn_objective"]))
    for name, secs, obj in rows:
        print(f"  {name:<44} {secs:9.2f} s   objective {obj:.5f}")
    print(f"  subsampled vs exact k-means: {result['subsampled_speedup']:.1f}x faster, "
          f"objective x{result['subsampled_objective_ratio']:.4f}")
    if "sklearn_s" in result:
        print(f"  dcscale vs scikit-learn: {result['speedup_vs_sklearn']:.1f}x (exact), "
              f"{result['speedup_vs_sklearn_subsampled']:.1f}x (subsampled)")
    if args.original:
        print(f"  dcscale vs the original settings: {result['speedup_vs_original']:.1f}x faster (PCA step "
              f"{result['pca_s']:.2f} s vs {result['original_pca_s']:.2f} s); NMI with the truth "
              f"{result['exact_nmi']:.4f} vs {result['original_nmi']:.4f}, "
              f"objective x{result['objective_vs_original']:.4f}; in the original's space "
              f"{result['common_space_objective']:.5f} vs {result['original_common_space_objective']:.5f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main())
