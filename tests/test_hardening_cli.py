"""Issue 21, part B: `dcscale train --check` refuses what training refuses, CLI arguments are validated,
output paths fail with one line, and a failed start leaves nothing behind.

Most cases run the CLI in this process (`dcscale.cli.main`, the same code as the command, without a
torch import per case; tests/cli_in_process.py where a logged warning must show too); the launcher cases
run the real scripts, except where slurm.py's main is called here for a check it makes before any job."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_in_process import dcscale, run_in_process
from conftest import tiny_run_overrides

from dcscale.cli import main as dcscale_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(Path(__file__).parent / "train_test.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def one_error_line(capsys, argv: list[str]) -> str:
    """Run `dcscale ARGV` in this process: it must exit 2 with exactly one line on stderr, which is returned."""
    code = dcscale_main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, out[-2000:] + err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def check_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--check", "--config", CONFIG,
            *tiny_run_overrides(shards, run_dir, **{"train.cycles": 1}), *extra]


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- 1. `dcscale train --check` opens what training opens ----------------------------------------------

def test_check_passes_on_good_inputs(digits_train_shards, tmp_path, capsys):
    assert dcscale_main(check_args(digits_train_shards, tmp_path / "run")) == 0
    assert "config and inputs ok" in capsys.readouterr().out
    assert not (tmp_path / "run").exists(), "--check writes nothing"


def _truncated_tar(shards: Path, tmp: Path) -> Path:
    root = copy_shards(shards, tmp / "truncated")
    os.truncate(root / "shard-000003.tar", 100_000)
    return root


def _missing_shard(shards: Path, tmp: Path) -> Path:
    root = copy_shards(shards, tmp / "missing")
    (root / "shard-000005.tar").unlink()
    return root


def _lying_manifest(shards: Path, tmp: Path) -> Path:
    root = copy_shards(shards, tmp / "lying")
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text.replace('"count": 37', '"count": 38').replace('"total": 1437',
                                                                                          '"total": 1438'))
    return root


@pytest.mark.parametrize("damage, message", [
    (_truncated_tar, "shard-000003.tar: 100000 bytes but the manifest says"),
    (_missing_shard, "shard not found:"),
    (_lying_manifest, "shard-000007.tar: holds 37 samples but"),
])
def test_check_verifies_the_tars_against_the_manifest(damage, message, digits_train_shards, tmp_path, capsys):
    line = one_error_line(capsys, check_args(damage(digits_train_shards, tmp_path), tmp_path / "run"))
    assert message in line


def _garbage(tmp: Path) -> str:
    path = tmp / "garbage.pt"
    path.write_bytes(b"not a checkpoint at all\n" * 10)
    return str(path)


@pytest.mark.parametrize("setting, message", [
    (lambda t: f"model.init={_garbage(t)}", "model.init: "),
    (lambda t: f"resume={_garbage(t)}", "damaged or not a checkpoint"),
    (lambda t: "cluster.k=5000", "cluster.k = 5000 is more than the 1437 images"),
    (lambda t: "cluster.pca_dim=5000", "cluster.pca_dim = 5000 is more than the 84 feature dimensions of lenet5"),
    (lambda t: "data.image_size=1", "cannot take 1x1 inputs"),
    (lambda t: "data.mean=[0.5,0.5,0.5]", "data.mean has 3 values but the images have 1 channel"),
    (lambda t: "data.std=[0.5,0.5]", "data.std has 2 values but the images have 1 channel"),
])
def test_check_refuses_what_training_refuses(setting, message, digits_train_shards, tmp_path, capsys):
    line = one_error_line(capsys, check_args(digits_train_shards, tmp_path / "run", setting(tmp_path)))
    assert message in line


def test_check_refuses_sync_bn_on_cpu_for_several_processes(digits_train_shards, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: SyncBatchNorm runs")
    argv = check_args(digits_train_shards, tmp_path / "run", "model.sync_bn=true")
    assert dcscale_main(argv) == 0  # one process: nothing to synchronise
    capsys.readouterr()
    assert "model.sync_bn = true with processes on cpu" in one_error_line(capsys, [*argv, "--nproc", "2"])


def test_check_refuses_a_run_directory_held_by_a_live_run(digits_train_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as held:
        held.write("host elsewhere, pid 4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `dcscale train` holds it
        line = one_error_line(capsys, check_args(digits_train_shards, run_dir))
    assert "is in use by another run (host elsewhere, pid 4242)" in line
    assert dcscale_main(check_args(digits_train_shards, run_dir)) == 0  # released: free again


def test_torchrun_sh_checks_once_and_never_starts_workers(digits_train_shards, tmp_path):
    """A garbage model.init is refused by the launcher's check in one line: no worker starts, nothing restarts."""
    started = time.monotonic()
    proc = subprocess.run([str(ROOT / "launch" / "torchrun.sh"), "--nproc-per-node", "2", "--max-restarts", "3",
                           "--", "--config", CONFIG, *tiny_run_overrides(digits_train_shards, tmp_path / "run"),
                           f"model.init={_garbage(tmp_path)}"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("dcscale: error: model.init: ") and proc.stdout == ""
    assert time.monotonic() - started < 60


# ---- 3. command-line values: one line each ---------------------------------------------------------------

def _probe(train: Path, test: Path, *extra: str) -> list[str]:
    return ["probe", "--random-init", "--config", CONFIG, "--train", str(train), "--test", str(test),
            "--layer", "all", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--lr", "nan"], "--lr nan: expected a finite number > 0"),
    (["--lr", "inf"], "--lr inf: expected a finite number > 0"),
    (["--momentum", "5"], "--momentum 5.0: expected a number in [0, 1)"),
    (["--weight-decay", "nan"], "--weight-decay nan: expected a finite number >= 0"),
    (["--extract-batch-size", "0"], "--extract-batch-size 0: expected an integer >= 1"),
    (["--workers", "-1"], "--workers -1: expected an integer >= 0"),
    (["--seed", "-1"], "--seed -1: expected an integer from 0 to 2**64 - 1"),
])
def test_probe_refuses_bad_values(extra, message, digits_train_shards, digits_test_shards, capsys):
    assert message in one_error_line(capsys, _probe(digits_train_shards, digits_test_shards, *extra))


def test_probe_refuses_overrides_without_config(digits_train_shards, digits_test_shards, capsys):
    argv = ["probe", "--checkpoint", "x.pt", "--train", str(digits_train_shards), "--test", str(digits_test_shards),
            "--layer", "all", "eval.probe_epochs=2"]
    assert "eval.probe_epochs=2: key=value overrides need --config FILE" in one_error_line(capsys, argv)


@pytest.mark.parametrize("seed", ["-1", str(2**64), "100000000000000000000000"])
def test_seed_outside_64_bits_is_refused(seed, capsys):
    line = one_error_line(capsys, ["config", CONFIG, f"seed={seed}"])
    assert f"seed = {seed}" in line and "expected an integer from 0 to 2**64 - 1" in line


def test_workers_below_zero_is_refused(digits_train_shards, tmp_path, capsys):
    line = one_error_line(capsys, ["shards", "digits", "--out", str(tmp_path / "s"), "--workers", "-1"])
    assert "--workers -1: expected an integer >= 1" in line and not (tmp_path / "s").exists()
    line = one_error_line(capsys, ["embed", "--checkpoint", "x.pt", "--shards", str(digits_train_shards),
                                   "--out", str(tmp_path / "e"), "--workers", "-1"])
    assert "--workers -1: expected an integer >= 0" in line


def _script(argv: list[str], timeout: float = 120) -> tuple[int, list[str], str]:
    proc = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, [ln for ln in proc.stderr.splitlines() if ln.strip()], proc.stdout


SWEEP = [sys.executable, str(ROOT / "tools" / "sweep.py"), "--config", CONFIG]
SLURM = [sys.executable, str(ROOT / "launch" / "slurm.py"), "--config", CONFIG]


@pytest.mark.parametrize("args, message", [
    (["--nproc", "0", "--grid", "cluster.k=5,10"], "sweep: error: --nproc 0: expected an integer >= 1"),
    (["--grid", "cluster.k=5", "--grid", "cluster.k=10"], "sweep: error: --grid cluster.k is given twice"),
])
def test_sweep_refuses_bad_arguments(args, message, tmp_path):
    code, lines, _ = _script([*SWEEP, "--out", str(tmp_path / "sweep"), *args])
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("flag", ["--partition", "--comment", "--name"])
def test_slurm_refuses_control_characters_in_sbatch_values(flag, digits_train_shards, tmp_path):
    code, lines, out = _script([*SLURM, "--dry-run", flag, "gpu\n#SBATCH --mem=1T",
                                f"data.train={digits_train_shards}", "data.image_size=32", f"output.dir={tmp_path / 'run'}"])
    assert code == 2 and len(lines) == 1 and "control characters" in lines[0], lines
    assert "#SBATCH --mem=1T" not in out


def _slurm_in_process(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """launch/slurm.py's main(argv) in this process (its checks before submitting are plain Python)."""
    spec = importlib.util.spec_from_file_location("dcscale_slurm_launcher", ROOT / "launch" / "slurm.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    done = run_in_process(launcher.main, argv, capsys)
    return done.returncode, [ln for ln in done.stderr.splitlines() if ln.strip()], done.stdout


def test_slurm_refuses_gpus_this_machine_lacks_when_running_here(digits_train_shards, tmp_path, capsys):
    import torch

    gpus = torch.cuda.device_count()
    code, lines, _ = _slurm_in_process([*SLURM[2:], "--cluster", "local", "--gpus-per-node", str(gpus + 1),
                                        f"data.train={digits_train_shards}", "data.image_size=32",
                                        f"output.dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert f"--gpus-per-node {gpus + 1} with --cluster local: this machine has {gpus} GPU(s)" in lines[0]
    assert not (tmp_path / "run").exists()
    # On SLURM the job runs elsewhere: the login node's GPUs say nothing, so --dry-run goes through.
    code, lines, _ = _slurm_in_process([*SLURM[2:], "--dry-run", "--gpus-per-node", str(gpus + 1),
                                        f"data.train={digits_train_shards}", "data.image_size=32",
                                        f"output.dir={tmp_path / 'run'}"], capsys)
    assert code == 0, lines


@pytest.mark.parametrize("port", ["abc", "0", "70000", "-1"])
def test_torchrun_sh_refuses_a_bad_port(port):
    code, lines, _ = _script([str(ROOT / "launch" / "torchrun.sh"), "--port", port, "--", "--config", CONFIG])
    assert code == 2 and lines == [f"launch/torchrun.sh: error: --port {port}: expected a port number from 1 to 65535"]


# ---- 4. output paths: a file in the way, a read-only or full file system ----------------------------------

METRICS = ('{"cycle": 0, "loss": 2.0, "accuracy": 0.3, "clustered": true, "nmi_prev": null, "nmi_gt": 0.5}\n'
           '{"cycle": 1, "loss": 1.5, "accuracy": 0.4, "clustered": true, "nmi_prev": 0.6, "nmi_gt": 0.55}\n')


@pytest.fixture
def run_with_metrics(tmp_path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(METRICS)
    return run_dir


def _commands(where: Path, train: Path, test: Path, run_dir: Path) -> dict[str, list[str]]:
    """name -> `dcscale` arguments writing under `where`."""
    probe = ["probe", "--random-init", "--config", CONFIG, "--train", str(train), "--test", str(test),
             "--layer", "pixels", "data.image_size=32"]
    return {
        "probe --json": [*probe, "--json", str(where / "probe.json")],
        "probe --cache-dir": [*probe, "--cache-dir", str(where / "cache")],
        "report --out": ["report", str(run_dir), "--out", str(where / "report")],
        "ia --out": ["ia", "--config", CONFIG, "--vary", "cluster.k=5,10", "--seeds", "1", "--out", str(where / "ia"),
                     f"data.train={train}", "data.image_size=32"],
        "shards --out": ["shards", "digits", "--out", str(where / "shards"), "--workers", "1"],
    }


def _sweep(where: Path, train: Path) -> list[str]:
    return [*SWEEP, "--grid", "cluster.k=5,10", "--out", str(where / "sweep"), "--collect-only",
            "--set", f"data.train={train}", "--set", "data.image_size=32"]


@pytest.mark.parametrize("name", ["probe --json", "probe --cache-dir", "report --out", "ia --out", "shards --out"])
def test_an_output_path_under_a_file_is_one_line(name, digits_train_shards, digits_test_shards, run_with_metrics,
                                                 tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way\n")
    line = one_error_line(capsys, _commands(blocker, digits_train_shards, digits_test_shards, run_with_metrics)[name])
    assert str(blocker) in line, line
    assert any(why in line for why in ("Not a directory", "it is a file, not a directory", "a file is in the way")), line
    assert blocker.read_text() == "in the way\n"


@pytest.mark.parametrize("name", ["report --out", "ia --out", "probe --cache-dir"])
def test_an_output_directory_that_is_a_file_is_one_line(name, digits_train_shards, digits_test_shards,
                                                        run_with_metrics, tmp_path, capsys):
    argv = _commands(tmp_path, digits_train_shards, digits_test_shards, run_with_metrics)[name]
    target = Path(argv[argv.index(name.split()[1]) + 1])
    target.write_text("a file\n")
    assert "it is a file, not a directory" in one_error_line(capsys, argv)
    assert target.read_text() == "a file\n"


def test_sweep_out_under_a_file_is_one_line(digits_train_shards, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way\n")
    code, lines, _ = _script(_sweep(blocker, digits_train_shards))
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"sweep: error: --out {blocker}/sweep: "), lines
    assert "Not a directory" in lines[0]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A mount point and a function to mount a tmpfs there with options (umounted at the end); skipped
    where this process may not mount (not root, or in a container without the capability)."""
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    mounted = []

    def mount(options: str) -> Path:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): needs root")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("name", ["probe --json", "probe --cache-dir", "report --out", "ia --out", "shards --out"])
def test_an_output_path_on_a_read_only_file_system_is_one_line(name, digits_train_shards, digits_test_shards,
                                                               run_with_metrics, small_tmpfs, capsys):
    read_only = small_tmpfs("ro,size=1m")
    line = one_error_line(capsys, _commands(read_only, digits_train_shards, digits_test_shards,
                                            run_with_metrics)[name])
    assert str(read_only) in line and "Read-only file system" in line, line


def test_sweep_out_on_a_read_only_file_system_is_one_line(digits_train_shards, small_tmpfs):
    read_only = small_tmpfs("ro,size=1m")
    code, lines, _ = _script(_sweep(read_only, digits_train_shards))
    assert code == 2 and len(lines) == 1 and "Read-only file system" in lines[0], lines


@pytest.mark.parametrize("name", ["probe --json", "report --out", "shards --out"])
def test_an_output_on_a_full_file_system_is_one_line(name, digits_train_shards, digits_test_shards,
                                                     run_with_metrics, small_tmpfs, capsys):
    full = small_tmpfs("size=64k")
    if name == "probe --json":  # the results are small: fill the file system first
        with open(full / "filler", "wb", buffering=0) as f:
            with pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 4096)
    line = one_error_line(capsys, _commands(full, digits_train_shards, digits_test_shards, run_with_metrics)[name])
    assert str(full) in line and "No space left on device (the disk or quota is full)" in line, line
    if name == "shards --out":
        assert os.listdir(full) == [], "a failed build leaves nothing behind"


# ---- 5. a failed start leaves the run directory as it found it --------------------------------------------

def _train(capsys, shards: Path, run_dir: Path, *extra: str):
    """`dcscale train` (one cycle) in this process: returncode, stdout, stderr."""
    return dcscale(["train", "--config", CONFIG, *tiny_run_overrides(shards, run_dir, **{"train.cycles": 1}), *extra],
                   capsys)


def _undecodable(shards: Path, dst: Path) -> Path:
    """A copy of the shard set whose image bytes are zeros (same sizes: the manifest and index still agree)."""
    import tarfile

    root = copy_shards(shards, dst)
    for tar_path in sorted(root.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            spans = [(m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith(".png")]
        with open(tar_path, "r+b") as f:
            for offset, size in spans:
                f.seek(offset)
                f.write(b"\0" * size)
    return root


def test_a_start_that_fails_after_claiming_leaves_no_trace(digits_train_shards, tmp_path, capsys):
    """A damaged resume checkpoint is found once the run directory is locked: the directories this run
    created go again; a directory the user made keeps exactly what it held."""
    new = tmp_path / "new" / "run"
    proc = _train(capsys, digits_train_shards, new, f"resume={_garbage(tmp_path)}")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "damaged or not a checkpoint" in lines[0], proc.stderr
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine\n")
    proc = _train(capsys, digits_train_shards, existing, f"resume={_garbage(tmp_path)}")
    assert proc.returncode == 2, proc.stderr
    assert sorted(os.listdir(existing)) == ["notes.txt"]


def test_a_run_that_fails_at_its_first_cycle_removes_config_and_tensorboard(digits_train_shards, tmp_path, capsys):
    """No image decodes: the run stops at cycle 0, after it wrote config.yaml and tb/; both go again."""
    run_dir = tmp_path / "run"
    proc = _train(capsys, _undecodable(digits_train_shards, tmp_path / "zeros"), run_dir)
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 2 and len(lines) == 1 and "could be decoded" in lines[0], proc.stderr[-3000:]
    assert f"fresh run; run dir {run_dir}" in proc.stdout  # (printed once config.yaml and tb/ are written)
    assert not run_dir.exists(), sorted(os.listdir(run_dir))


def test_a_start_refused_by_a_live_run_leaves_that_runs_files(digits_train_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "tb").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 0\n")
    with open(run_dir / ".lock", "w") as held:
        held.write("host elsewhere, pid 4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = _train(capsys, digits_train_shards, run_dir)
    assert proc.returncode == 2 and "is in use by another run (host elsewhere, pid 4242)" in proc.stderr
    assert sorted(os.listdir(run_dir)) == [".lock", "config.yaml", "tb"]
