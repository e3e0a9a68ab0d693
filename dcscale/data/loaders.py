"""DataLoaders over a ShardSet: the extraction pass (ordered, partitioned) and training (random access).

With the transforms of dcscale.data.transforms (objects with decode/collate/finish|augment), workers
decode each image straight to a uint8 tensor and hand over one uint8 batch; the float work (resize,
crop, normalise) runs on the whole batch, at extraction in the main process on the model's device.
Any other callable transform is applied per PIL image in the workers, as before.

Undecodable images never crash a run and are never dropped silently: the extraction loader
carries each batch's skipped indices back to the main process (`loader.skipped`), and the training
collate function returns how many samples of the batch it dropped.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from dcscale.data.partition import extraction_batches, rank_range, worker_batches
from dcscale.data.shardset import ShardSet
from dcscale.data.transforms import draw_uniforms


# ---- extraction --------------------------------------------------------------------------------

class _ExtractionBatches(IterableDataset):
    """Yields this worker's batches of the rank's range (partition.extraction_batches), ready-made."""

    def __init__(self, shardset: ShardSet, transform, indices, batch_size: int, finish: bool):
        self.shardset = shardset
        self.transform = transform
        self.indices = indices
        self.batch_size = batch_size
        self.finish = finish  # run the batch transform's float work here (CPU runs) or leave it to the device

    def __iter__(self):
        info = get_worker_info()
        workers, me = (info.num_workers, info.id) if info else (1, 0)
        # batches are laid out over positions in `indices` (a range, or a sorted array of indices)
        for batch in worker_batches(range(len(self.indices)), workers, me, self.batch_size):
            yield self._batch(self.indices[batch.start:batch.stop])

    def _batch(self, indices) -> dict:
        kept, images, skipped = [], [], []
        batched = is_batch_transform(self.transform)
        for i in map(int, indices):
            if batched:
                image, _ = self.transform.decode(self.shardset, i)
            else:
                sample = self.shardset.read(i)
                image = None if sample is None else self.transform(sample.image)
            if image is None:
                skipped.append(i)
                continue
            kept.append(i)
            images.append(image)
        if images:
            images = self.transform.collate(images) if batched else torch.stack(images)
            if batched and self.finish:
                images = self.transform.finish(images)
        # one tensor per batch crosses the process boundary (each costs a shared-memory segment)
        return {"indices": kept, "images": images if kept else None, "skipped": skipped}


def is_batch_transform(transform) -> bool:
    """A dcscale transform object (decode in workers, float work on whole batches)?"""
    return all(hasattr(transform, name) for name in ("decode", "collate"))


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
                 num_workers: int, pin_memory: bool = False, device=None, indices=None):
        # indices: a sorted subset of the rank's slice to read instead of all of it (the PCA sample)
        self.indices = rank_range(len(shardset), world_size, rank) if indices is None else np.asarray(indices)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.transform = transform
        self.device = device  # where the batch's float work runs and the images are yielded (None: CPU)
        self.skipped: list[int] = []
        # On a CPU run the float work (resize, crop, normalise) joins the decoding in the workers,
        # off the process that runs the model; on an accelerator it runs there, on the whole batch.
        self._finish_here = is_batch_transform(transform) and device is not None and torch.device(device).type != "cpu"
        dataset = _ExtractionBatches(shardset, transform, self.indices, batch_size, finish=not self._finish_here)
        self._loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                  collate_fn=_keep)

    def __len__(self) -> int:
        return num_extraction_batches(len(self.indices), self.batch_size, self.num_workers)

    def __iter__(self):
        self.skipped = []
        for batch in self._loader:
            self.skipped.extend(batch["skipped"])
            if batch["images"] is None:
                continue
            images = batch["images"]
            if self._finish_here:
                images = self.transform.finish(images, self.device)
            elif self.device is not None:
                images = images.to(self.device, non_blocking=True)
            yield torch.tensor(batch["indices"], dtype=torch.long), images


def _keep(batch):
    return batch


def extraction_loader(shardset: ShardSet, transform, rank: int, world_size: int, batch_size: int,
                      num_workers: int, pin_memory: bool = False, device=None, indices=None) -> ExtractionLoader:
    return ExtractionLoader(shardset, transform, rank, world_size, batch_size, num_workers, pin_memory, device,
                            indices)


# ---- training ----------------------------------------------------------------------------------

class TrainBatch(NamedTuple):
    images: torch.Tensor  # [b, C, H, W]; b may be 0 if every draw was undecodable
    labels: torch.Tensor  # int64 [b]
    indices: torch.Tensor  # int64 [b], global indices
    skipped: int  # undecodable draws dropped from this batch


class SeededDraws(Dataset):
    """The training draws: items are (position in this rank's draw, global index) pairs (see
    dcscale.train.loop.WithPositions); workers decode to uint8 and `collate` augments the whole
    batch with uniforms drawn from (seed, cycle, epoch, position), so a resumed epoch sees exactly
    the crops and flips the uninterrupted one saw, whatever worker or batch computes them.

    `transform` is a dcscale TrainTransform (decode/collate/augment/n_uniforms).
    """

    def __init__(self, shardset: ShardSet, labels: np.ndarray, transform, seed: int, cycle: int):
        if len(labels) != len(shardset):
            raise ValueError(f"{len(labels)} labels for a shard set of {len(shardset)} samples")
        self.shardset, self.labels, self.transform = shardset, np.asarray(labels), transform
        self.seed, self.cycle, self.epoch = seed, cycle, 0

    def __len__(self) -> int:
        return len(self.shardset)

    def __getitem__(self, item):
        position, index = item
        image, _ = self.transform.decode(self.shardset, int(index))
        if image is None:
            return None
        return image, int(self.labels[index]), int(index), int(position)

    def collate(self, batch: list) -> TrainBatch:
        """Drop (and count) undecodable draws, then augment the rest as one batch."""
        good = [item for item in batch if item is not None]
        skipped = len(batch) - len(good)
        if not good:
            empty = torch.zeros(0, dtype=torch.long)
            return TrainBatch(torch.zeros(0), empty, empty.clone(), skipped)
        images, labels, indices, positions = zip(*good)
        uniforms = draw_uniforms((self.seed, self.cycle, self.epoch), positions, self.transform.n_uniforms)
        batch_images = self.transform.augment(self.transform.collate(list(images)), uniforms)
        return TrainBatch(batch_images, torch.tensor(labels, dtype=torch.long),
                          torch.tensor(indices, dtype=torch.long), skipped)
