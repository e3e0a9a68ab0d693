"""Config loading, overrides and the one-line validation errors users see."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dcscale.cli import main
from dcscale.config import ConfigError, config_from_dict, dump_config, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(_write(tmp_path, "cluster: {k: 20}\n"),
                      ["cluster.k=500", "train.lr=0.05", "cluster.pca_dim=null", "model.sobel=true",
                       "train.weight_decay=1e-5", "data.mean=[0.1, 0.2, 0.3]"])
    assert cfg.cluster.k == 500 and cfg.train.lr == 0.05 and cfg.cluster.pca_dim is None
    assert cfg.model.sobel is True and cfg.train.weight_decay == 1e-5 and cfg.data.mean == [0.1, 0.2, 0.3]
    assert cfg.train.cycles == 10  # untouched keys keep their defaults


def test_unknown_key_names_the_key_the_file_and_the_closest_valid_key(tmp_path):
    path = _write(tmp_path, "cluster:\n  pca_dimm: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"unknown config key 'cluster.pca_dimm' in {path} (did you mean 'cluster.pca_dim'?)"
    with pytest.raises(ConfigError, match=r"unknown config key 'trian' in .* \(did you mean 'train'\?\)"):
        load_config(_write(tmp_path, "trian: {lr: 0.1}\n"))
    with pytest.raises(ConfigError, match=r"'train.lrr' in the command line \(did you mean 'train.lr'\?\)"):
        load_config(None, ["train.lrr=0.1"])


@pytest.mark.parametrize("override, message", [
    ("cluster.k=ten", "cluster.k = 'ten' in the command line: expected an integer"),
    ("cluster.k=1", "cluster.k = 1 in the command line: expected an integer >= 2"),
    ("train.momentum=1.5", "train.momentum = 1.5 in the command line: expected a number in [0, 1)"),
    ("model.arch=alexnett", "model.arch = 'alexnett' in the command line: expected one of lenet5, alexnet,"),
    ("train.augment=heavy", "train.augment = 'heavy' in the command line: expected one of 'imagenet', 'small', 'none'"),
    ("cluster.kmeans=gpu", "cluster.kmeans = 'gpu' in the command line: expected one of 'distributed', 'rank0'"),
    ("model.sobel=maybe", "model.sobel = 'maybe' in the command line: expected true/false"),
    ("train.augment_per_batch=1", "train.augment_per_batch = 1 in the command line: expected true/false"),
    ("cluster.halt_after=0", "cluster.halt_after = 0 in the command line: expected an integer >= 1"),
    ("resume=sometimes", "resume = 'sometimes' in the command line: expected 'auto' or a path to a .pt"),
    ("cluster.k", "override 'cluster.k': expected key=value"),
    ("train.lr=.inf", "train.lr = inf in the command line: expected a finite number"),
    ("train.momentum=nan", "train.momentum = 'nan' in the command line: expected a finite number"),
    ("dist.timeout_min=1e300", "dist.timeout_min = 1e+300 in the command line: expected a number of minutes > 0"),
    ("data.mean=[0.5, .nan]", "data.mean = [0.5, nan] in the command line: expected a list of finite numbers or null"),
    ("data.std=[0.0001]", "data.std = [0.0001] in the command line: expected numbers >= 0.001"),
    ("data.mean=[2.0]", "data.mean = [2.0] in the command line: expected numbers in [0, 1]"),
    ("cluster=5", "'cluster' in the command line is a config section, not a key: set one of its keys, e.g. cluster.k="),
])
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(_write(tmp_path, "cluster: [k: 3\n"))
    with pytest.raises(ConfigError, match=r"expected a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"cluster.k = 3.5 in .*run.yaml: expected an integer"):
        load_config(_write(tmp_path, "cluster: {k: 3.5}\n"))
    with pytest.raises(ConfigError, match=r"run.yaml \(line 3\): key 'k' is given twice in the same section"):
        load_config(_write(tmp_path, "cluster:\n  k: 3\n  k: 4\n"))
    (tmp_path / "latin1.yaml").write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not a text file \(byte 13 is not UTF-8\)"):
        load_config(tmp_path / "latin1.yaml")
    (tmp_path / "nul.yaml").write_bytes(b"seed: 1\x00\x00")
    with pytest.raises(ConfigError, match=r"nul.yaml: not a text file \(it holds NUL bytes\)"):
        load_config(tmp_path / "nul.yaml")
    # A key that overrides a YAML merge (<<) is not a duplicate.
    cfg = load_config(_write(tmp_path, "cluster:\n  <<: {k: 3, niter: 5}\n  k: 4\n"))
    assert cfg.cluster.k == 4 and cfg.cluster.niter == 5


def test_saved_config_reloads_to_the_same_config(tmp_path):
    cfg = load_config(ROOT / "configs" / "digits_demo.yaml", ["cluster.k=77", "cluster.halt_after=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert config_from_dict({}) == load_config(None)
    assert "k: 77" in dump_config(cfg)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_shipped_configs_are_valid(path):
    load_config(ROOT / path)


# The Deep Dive authors' numbers (AhmadM-DL/DeepClusterImplementation, branch `new`, jobs/*/vary_halt and
# jobs/MNIST/vary_space hyper.json and job scripts), pinned so that configs/paper/ cannot drift from them.
PAPER_SETTINGS = {
    "mnist_lenet5.yaml": dict(arch="lenet5", sobel=False, k=5, pca_dim=None, lr=0.1, momentum=0.1, batch_size=64,
                              cycles=29, resize=44, mean=[0.1307], std=[0.3081], per_batch=False),
    "fmnist_lenet5.yaml": dict(arch="lenet5", sobel=False, k=5, pca_dim=None, lr=0.1, momentum=0.1, batch_size=128,
                               cycles=49, resize=44, mean=[0.2860], std=[0.3205], per_batch=True),
    "svhn_alexnet_micro.yaml": dict(arch="alexnet_micro", sobel=True, k=500, pca_dim=256, lr=0.1, momentum=0.5,
                                    batch_size=64, cycles=99, resize=45, mean=[0.437, 0.443, 0.472],
                                    std=[0.198, 0.201, 0.197], per_batch=True),
    # SVHN's mean/std: jobs/CIFAR10_32/*/cifar.py copies them.
    "cifar10_alexnet_micro.yaml": dict(arch="alexnet_micro", sobel=True, k=1000, pca_dim=256, lr=0.1, momentum=0.9,
                                       batch_size=64, cycles=99, resize=45, mean=[0.437, 0.443, 0.472],
                                       std=[0.198, 0.201, 0.197], per_batch=True),
}


def test_paper_configs_carry_the_authors_settings():
    assert sorted(p.name for p in (ROOT / "configs" / "paper").glob("*.yaml")) == sorted(PAPER_SETTINGS)
    for name, want in PAPER_SETTINGS.items():
        cfg = load_config(ROOT / "configs" / "paper" / name)
        got = dict(arch=cfg.model.arch, sobel=cfg.model.sobel, k=cfg.cluster.k, pca_dim=cfg.cluster.pca_dim,
                   lr=cfg.train.lr, momentum=cfg.train.momentum, batch_size=cfg.train.batch_size,
                   cycles=cfg.train.cycles, resize=cfg.data.resize, mean=cfg.data.mean, std=cfg.data.std,
                   per_batch=cfg.train.augment_per_batch)
        assert got == want, name
        # Common to all four: weight decay 0.001, batch norm, 32x32 input, RandomResizedCrop(32) at torchvision's
        # default scale without flips, one epoch per cycle, 20 k-means iterations on every row, PCA (if any)
        # fitted on every row, never halting, a 20-epoch probe.
        assert (cfg.train.weight_decay, cfg.model.batch_norm, cfg.data.image_size) == (0.001, True, 32), name
        assert (cfg.train.augment, cfg.train.crop_scale_min, cfg.train.hflip) == ("imagenet", 0.08, False), name
        assert (cfg.train.epochs_per_cycle, cfg.cluster.niter, cfg.cluster.max_points_per_centroid) == (1, 20, None)
        assert (cfg.cluster.pca_sample, cfg.cluster.halt_after, cfg.eval.probe_epochs) == (None, None, 20), name
        # deep_clustering.py adds the head to the body's optimizer: same momentum (the original's head: 0)
        assert cfg.train.head_momentum == cfg.train.momentum, name
    mnist = load_config(ROOT / "configs" / "paper" / "mnist_lenet5.yaml")
    assert (mnist.data.train, mnist.data.test) == ("data/mnist_sample/train", "data/mnist_sample/test")


def test_cli_prints_the_resolved_config_or_one_error_line(tmp_path, capsys):
    assert main(["config", str(ROOT / "configs" / "digits_demo.yaml"), "cluster.k=12"]) == 0
    assert "  k: 12\n" in capsys.readouterr().out
    assert main(["config", str(tmp_path / "missing.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"dcscale: error: config file not found: {tmp_path / 'missing.yaml'}"


def test_python_dash_m_is_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "dcscale", "config", str(ROOT / "configs" / "digits_demo.yaml"),
                           "cluster.kk=3"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dcscale: error: unknown config key 'cluster.kk' in the command line (did you mean 'cluster.k'?)"]


def test_head_optimizer_takes_train_head_momentum():
    from dcscale.models import build_model
    from dcscale.train.optim import new_head_optimizer

    model = build_model("lenet5", in_channels=1, image_size=32, num_classes=5)
    original = new_head_optimizer(model, load_config(None, []))
    deep_dive = new_head_optimizer(model, load_config(ROOT / "configs" / "paper" / "mnist_lenet5.yaml", []))
    assert original.defaults["momentum"] == 0.0
    assert deep_dive.defaults["momentum"] == 0.1
    assert {id(p) for p in deep_dive.param_groups[0]["params"]} == {id(p) for p in model.head_parameters()}
