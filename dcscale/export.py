"""Hand a trained network to the next job: read dcscale network files, write exports.

`dcscale export CHECKPOINT --out FILE --format F`:
  - `torchvision` (resnet50, vgg16_bn; no Sobel): a plain state_dict that
    `torchvision.models.<arch>(num_classes=K)` loads with strict=True, K being the checkpoint's
    cluster count: the DeepCluster head is mapped onto torchvision's last layer (`fc`,
    `classifier.6`), so the torchvision model's logits are dcscale's. Replace that layer for another
    task. DeepCluster's AlexNet (96/256/384/384/256 filters, batch norm) has no torchvision
    counterpart, nor do the small networks (lenet5, the 32x32 AlexNets).
  - `backbone` (every arch): the body alone (image -> clustered features, no head) plus a metadata
    block (arch, input shape, normalisation, Sobel, feature size, the run's config and position),
    read back by `dcscale.load_backbone`, `dcscale embed` and `dcscale probe`.

Both are written atomically (temporary file, then rename) and hold tensors and plain values only
(loaded with `torch.load(weights_only=True)`); a backbone export carries a checksum like a checkpoint.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from dcscale.config import config_to_dict
from dcscale.errors import DcscaleError
from dcscale.safefile import atomic_write
from dcscale.cycle.checkpoint import serialize
from dcscale.cycle.network import BACKBONE_FORMAT, BACKBONE_VERSION, Network, eval_transform, load_network

FORMATS = ("torchvision", "backbone")


# ---- backbone format ---------------------------------------------------------------------------

def backbone_state(net: Network, source: Path) -> dict:
    """The content of a backbone export: body weights and a metadata block of plain values."""
    transform = eval_transform(net)
    meta = {
        "arch": net.cfg.model.arch,
        "image_shape": list(net.image_shape),
        "resize": transform.resize,
        "mean": transform.normalise.mean.flatten().tolist(),
        "std": transform.normalise.std.flatten().tolist(),
        "sobel": net.cfg.model.sobel,
        "batch_norm": net.cfg.model.batch_norm,
        "feature_dim": net.model.feature_dim,
        **net.position,
        "source": str(source),
        "config": config_to_dict(net.cfg),
    }
    return {"format": BACKBONE_FORMAT, "version": BACKBONE_VERSION, "meta": meta,
            "body": net.model.body.state_dict()}


# ---- torchvision format ------------------------------------------------------------------------

def torchvision_state(net: Network) -> tuple[str, int, dict]:
    """(torchvision model name, num_classes, state_dict) that `torchvision.models.<name>(num_classes=
    num_classes)` loads with strict=True; one line when the network has no torchvision counterpart."""
    arch, cfg = net.cfg.model.arch, net.cfg
    backbone = "; use --format backbone (read by dcscale.load_backbone)"
    if cfg.model.sobel:
        raise DcscaleError(f"--format torchvision: this {arch} starts with a fixed Sobel filter (grayscale + "
                           f"image gradients) that no torchvision model has{backbone}")
    if arch == "alexnet":
        raise DcscaleError("--format torchvision: DeepCluster's AlexNet (conv 96/256/384/384/256, batch norm by "
                           "default) does not fit torchvision's (conv 64/192/384/256/256, no batch norm)" + backbone)
    if arch not in ("resnet50", "vgg16_bn"):
        raise DcscaleError(f"--format torchvision: {arch} has no torchvision counterpart{backbone}")
    if not net.has_head:
        raise DcscaleError("--format torchvision: a backbone export has no head to map onto torchvision's last "
                           "layer; export from the training checkpoint")
    c, h, _ = net.image_shape
    model = net.model
    if c != 3:
        raise DcscaleError(f"--format torchvision: torchvision's {arch} takes 3-channel images; this network takes "
                           f"{c}{backbone}")
    if arch == "resnet50":
        name, renames = "resnet50", {"body.features.": "", "head.": "fc."}
    else:
        if model.body.classifier.fc1.in_features != 512 * 7 * 7:
            raise DcscaleError(f"--format torchvision: torchvision's vgg16_bn classifier takes a 512x7x7 map "
                               f"(224x224 inputs); this network was trained on {h}x{h} inputs{backbone}")
        name = "vgg16_bn" if cfg.model.batch_norm else "vgg16"
        # torchvision numbers the layers of `features` in order, as dcscale's trunk lays them out
        renames = {f"body.features.{child}.": f"features.{i}."
                   for i, (child, _) in enumerate(model.body.features.named_children())}
        renames.update({"body.classifier.fc1.": "classifier.0.", "body.classifier.fc2.": "classifier.3.",
                        "head.": "classifier.6."})
    num_classes = model.head.out_features
    state = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        state[key if prefix is None else renames[prefix] + key[len(prefix):]] = value  # (unmapped: _check_fits says)
    _check_fits(name, num_classes, state)
    return name, num_classes, state


def _check_fits(name: str, num_classes: int, state: dict) -> None:
    """Every key and shape of torchvision's model, built on the meta device (no memory, no init)."""
    import torchvision

    with torch.device("meta"):
        expected = getattr(torchvision.models, name)(num_classes=num_classes).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    want = {k: tuple(v.shape) for k, v in expected.items()}
    if shapes != want:
        differ = sorted(set(shapes) ^ set(want)) or [k for k in want if shapes[k] != want[k]]
        raise DcscaleError(f"--format torchvision: the weights do not fit torchvision.models.{name} "
                           f"(first difference: {differ[0]})")


# ---- `dcscale export` --------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a dcscale checkpoint (e.g. runs/x/checkpoints/last.pt) or backbone export")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--format", choices=FORMATS, default="torchvision",
                        help="torchvision: a state_dict for torchvision.models.<arch>(num_classes=K) "
                             "(resnet50, vgg16_bn); backbone: the body and its metadata, for every arch")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise DcscaleError(f"--out {out} is a directory; give a file name")
    if out.exists() and not args.force:
        raise DcscaleError(f"--out {out} exists; give --force to replace it")
    net = load_network(args.checkpoint)
    if args.format == "torchvision":
        name, num_classes, state = torchvision_state(net)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        what = f"torchvision {name} state_dict: torchvision.models.{name}(num_classes={num_classes})"
    else:
        data = serialize(backbone_state(net, Path(args.checkpoint)))
        what = f"{net.cfg.model.arch} backbone ({net.model.feature_dim}-d features): dcscale.load_backbone"
    try:
        atomic_write(out, lambda f: f.write(data))
    except OSError as err:
        raise DcscaleError(f"cannot write {out}: {err.strerror or err}; nothing was written") from None
    print(f"export: wrote {out} ({len(data) / 2**20:.1f} MiB), {what}{_trained_for(net.position)}")
    return 0


def _trained_for(position: dict) -> str:
    """How far the run had got (a checkpoint's cycle counts the cycles done when its epoch and step are 0)."""
    cycle, epoch, step = position["cycle"], position["epoch"], position["step"]
    if cycle is None:
        return ""
    if not epoch and not step:
        return f"; trained for {cycle} cycle(s)"
    return f"; written in cycle {cycle} (epoch {epoch}, step {step})"
