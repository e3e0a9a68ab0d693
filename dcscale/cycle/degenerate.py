"""Degenerate clustering: the cycles where DeepCluster has fallen into a trivial solution, said in
words (the cycle's console line, `degenerate` in metrics.jsonl, `cluster/degenerate` in TensorBoard).

Two signs (what they say on the demo, the paper configs and runs built to collapse: docs/degenerate.md):

- **One giant cluster**: the largest cluster holds more than (1 + 1/K) / 2 of the labelled images,
  midway between its fair share 1/K and all of them: more than half for any K (55% at K=10, 60% at
  K=5, 75% at K=2, where one of the two always holds at least half). Features that no longer tell
  images apart put them all at one centroid; the trivial solution of a loss near 0 on labels that
  no longer change shows this way too.
- **Not learning**: from cycle 1 on, the cycle's training loss is at or above chance level, ln of
  the number of non-empty clusters (what predicting every cluster alike costs), and its accuracy on
  the pseudo-labels is below 1.5 times chance (the uniform sampler draws every non-empty cluster
  alike): the network learns nothing from its labels, typically a learning rate too high, and
  NMI with the ground truth sinks while the clusters stay balanced.
"""

from __future__ import annotations

import math

import numpy as np

ADVICE = ("try a lower train.lr, another cluster.k or cluster.pca_dim, or more (and more varied) images; "
          "the uniform cluster sampler is already on")


def giant_cluster_share(k: int) -> float:
    """The share of the images above which the largest of K clusters is called degenerate."""
    return (1.0 + 1.0 / k) / 2.0


def degenerate_clustering(sizes: np.ndarray, cycle: int, loss: float | None,
                          accuracy: float | None) -> str | None:
    """Why this cycle's clustering is degenerate, in words; None when it is not.

    `sizes`: the images in each of the K clusters (skipped images not counted); `loss`, `accuracy`:
    the cycle's training loss and accuracy on the pseudo-labels.
    """
    sizes = np.asarray(sizes)
    k, total = len(sizes), int(sizes.sum())
    if k < 2 or total == 0:
        return None
    largest = int(sizes.max())
    if largest / total > giant_cluster_share(k):
        return f"one cluster holds {math.floor(100 * largest / total)}% of the images"
    nonempty = int((sizes > 0).sum())
    if cycle < 1 or loss is None or accuracy is None or not math.isfinite(loss):
        return None  # cycle 0 trains a random network: its loss may still be near chance
    chance_loss, chance_accuracy = math.log(nonempty), 1.0 / nonempty
    if loss >= chance_loss and accuracy < 1.5 * chance_accuracy:
        return (f"the network is not learning its pseudo-labels: loss {loss:.3f} at chance level "
                f"(ln {nonempty} = {chance_loss:.3f}), accuracy {accuracy:.3f} (chance {chance_accuracy:.3f})")
    return None


def warning_text(reason: str) -> str:
    """The reason with what to try: what the console line and TensorBoard say."""
    return f"degenerate clustering: {reason}; {ADVICE}"


def cycle_runs(cycles: list[int]) -> list[tuple[int, int]]:
    """Sorted cycle numbers as (first, last) runs of consecutive cycles: [2, 3, 4, 7] -> [(2, 4), (7, 7)]."""
    runs: list[list[int]] = []
    for cycle in cycles:
        if runs and cycle == runs[-1][1] + 1:
            runs[-1][1] = cycle
        else:
            runs.append([cycle, cycle])
    return [(a, b) for a, b in runs]


def cycle_ranges(cycles: list[int]) -> str:
    """Sorted cycle numbers as ranges: [2, 3, 4, 7] -> '2-4, 7'."""
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in cycle_runs(cycles))


def logged_verdicts(rows: list[dict]) -> tuple[list[int], list[int]]:
    """(the degenerate cycles, the cycles not judged) of metrics.jsonl rows sorted by cycle. A row
    without a `degenerate` key was logged before training recorded it: it is not judged, not healthy."""
    flagged = [row["cycle"] for row in rows if row.get("degenerate")]
    unjudged = [row["cycle"] for row in rows if "degenerate" not in row]
    return flagged, unjudged
