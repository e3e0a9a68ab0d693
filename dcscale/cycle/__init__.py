"""The cycle layer: network + shard set -> features -> reduced rows -> labels, used alike by training,
evaluation (IA, embed, the probe, the k-NN monitor) and export. It imports data, models, cluster and the
ground floor, never training or evaluation (the import contracts in pyproject.toml).

- `phases`: extraction, PCA, k-means, assignment and the label exchange across ranks; `compute`: the
  device, precision and memory format they run under.
- `clustering`: one whole clustering pass of a cycle (`cluster_cycle`), the one reduce -> cluster ->
  assign it, IA and users run on rows already extracted (`cluster_rows_to_labels`), and the checks.
- `network`: the network of a dcscale file (checkpoint or backbone export), its input shape and its
  eval transform; `checkpoint`: the checkpoint file format (written and verified).
- `knn`: weighted k-NN accuracy; `images`: what a cycle's clusters look like; `records`: metrics.jsonl;
  `degenerate`: the rule that calls a cycle's clustering degenerate and its words (training logs them,
  `dcscale report` shows them).
"""
