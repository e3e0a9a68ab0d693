"""DataLoaders over a ShardSet: the extraction pass (ordered, partitioned) and training (random access).

Undecodable images never crash a run and are never dropped silently: the extraction loader
carries each batch's skipped indices back to the main process (`loader.skipped`), and the training
collate function returns how many samples of the batch it dropped.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torch.utils.data import default_collate

from dcscale.data.partition import extraction_batches, rank_range, worker_batches
from dcscale.data.shardset import ShardSet


# ---- extraction --------------------------------------------------------------------------------

class _ExtractionBatches(IterableDataset):
    """Yields this worker's batches of the rank's range (partition.extraction_batches), ready-made."""

    def __init__(self, shardset: ShardSet, transform, indices: range, batch_size: int):
        self.shardset = shardset
        self.transform = transform
        self.indices = indices
        self.batch_size = batch_size

    def __iter__(self):
        info = get_worker_info()
        workers, me = (info.num_workers, info.id) if info else (1, 0)
        for batch in worker_batches(self.indices, workers, me, self.batch_size):
            yield self._batch(batch)

    def _batch(self, indices: range) -> dict:
        kept, images, skipped = [], [], []
        for i in indices:
            sample = self.shardset.read(i)
            if sample is None:
                skipped.append(i)
                continue
            kept.append(i)
            images.append(self.transform(sample.image))
        return {
            "indices": torch.tensor(kept, dtype=torch.long),
            "images": torch.stack(images) if images else None,
            "skipped": torch.tensor(skipped, dtype=torch.long),
        }


def num_extraction_batches(n: int, batch_size: int, num_workers: int) -> int:
    """Batches an extraction loader over n indices yields at most (fewer if one is all undecodable)."""
    return len(extraction_batches(range(n), num_workers, batch_size))


class ExtractionLoader:
    """Iterate `(indices LongTensor[b], images FloatTensor[b,C,H,W])` over one rank's slice.

    Every index of the slice comes out exactly once, either in a batch or in `self.skipped`
    (undecodable images; filled in as iteration goes, reset at each new pass). Batches come out in
    global index order for any number of workers (see partition.extraction_batches).
    """

    def __init__(self, shardset: ShardSet, transform, rank: int, world_size: int, batch_size: int,
                 num_workers: int, pin_memory: bool = False):
        self.indices = rank_range(len(shardset), world_size, rank)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.skipped: list[int] = []
        dataset = _ExtractionBatches(shardset, transform, self.indices, batch_size)
        self._loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                  collate_fn=_keep)

    def __len__(self) -> int:
        return num_extraction_batches(len(self.indices), self.batch_size, self.num_workers)

    @property
    def num_batches(self) -> int:
        return len(self)

    def __iter__(self):
        self.skipped = []
        for batch in self._loader:
            self.skipped.extend(batch["skipped"].tolist())
            if batch["images"] is not None:
                yield batch["indices"], batch["images"]


def _keep(batch):
    return batch


def extraction_loader(shardset: ShardSet, transform, rank: int, world_size: int, batch_size: int,
                      num_workers: int, pin_memory: bool = False) -> ExtractionLoader:
    return ExtractionLoader(shardset, transform, rank, world_size, batch_size, num_workers, pin_memory)


# ---- training ----------------------------------------------------------------------------------

class ClusterTrainDataset(Dataset):
    """Map-style: ds[i] -> (image tensor, pseudo-label labels[i], i), or None if undecodable."""

    def __init__(self, shardset: ShardSet, labels: np.ndarray, transform):
        if len(labels) != len(shardset):
            raise ValueError(f"{len(labels)} labels for a shard set of {len(shardset)} samples")
        self.shardset = shardset
        self.labels = np.asarray(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.shardset)

    def __getitem__(self, index: int):
        sample = self.shardset.read(int(index))
        if sample is None:
            return None
        return self.transform(sample.image), int(self.labels[index]), int(index)


class TrainBatch(NamedTuple):
    images: torch.Tensor  # [b, C, H, W]; b may be 0 if every draw was undecodable
    labels: torch.Tensor  # int64 [b]
    indices: torch.Tensor  # int64 [b], global indices
    skipped: int  # undecodable draws dropped from this batch


def collate_skip_none(batch: list) -> TrainBatch:
    """Collate ClusterTrainDataset items, dropping (and counting) the undecodable ones."""
    good = [item for item in batch if item is not None]
    skipped = len(batch) - len(good)
    if not good:
        empty = torch.zeros(0, dtype=torch.long)
        return TrainBatch(torch.zeros(0), empty, empty.clone(), skipped)
    images, labels, indices = default_collate(good)
    return TrainBatch(images, labels, indices, skipped)
