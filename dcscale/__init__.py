"""dcscale: DeepCluster as a distributed training system, with the Deep Dive analysis tools."""

__version__ = "0.1.0"


def load_backbone(path, device="cpu"):
    """(network, transform) from a dcscale checkpoint or a `dcscale export --format backbone` file:
    the network without its head (image batch -> features), in eval mode on `device`, and its
    preprocessing (PIL image or uint8 [C, H, W] tensor -> float [C, S, S]).

        net, transform = dcscale.load_backbone("backbone.pt")
        feats = net(transform(image)[None])
    """
    from dcscale.cycle.network import load_backbone as load  # torch only when used: `import dcscale` stays light

    return load(path, device)
