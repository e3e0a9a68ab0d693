"""The reduce -> cluster -> assign steps of a DeepCluster cycle, and clustering metrics."""

from dcscale.cluster.kmeans import (KMeansResult, assign, cycle_seed, train_kmeans,
                                    training_row_indices, use_gpu)
from dcscale.cluster.metrics import cluster_stats, initial_alignment, nmi
from dcscale.cluster.pca import PCA, apply_pca, fit_pca, l2_normalize, sample_row_indices

__all__ = ["PCA", "KMeansResult", "apply_pca", "assign", "cluster_stats",
           "cycle_seed", "fit_pca", "initial_alignment", "l2_normalize", "nmi", "sample_row_indices",
           "train_kmeans", "training_row_indices", "use_gpu"]
