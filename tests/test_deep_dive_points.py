"""tools/reproduce_deep_dive.py point by point (--results): every finished point is one JSON file, a re-run
continues from the files already there (as a new session does from committed results), a file measured
under other settings is refused with one line naming them, and a point whose run died is finished, never
tabulated half-done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "reproduce_deep_dive.py"
sys.path.insert(0, str(ROOT / "tools"))

import deep_dive_points as ddp  # noqa: E402


def tool(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), "--tiny", "--dataset", "digits", "--results", str(tmp / "results"),
                           "--runs", str(tmp / "runs"), "--data", str(tmp / "data"), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def files(tmp: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp / "results")) for p in (tmp / "results").glob("*/*.json"))


def test_plan_orders_points_once_most_telling_first():
    plan = ddp.Plan(k0=5, ia_ks=(5, 7, 10, 20), ia_seeds_per_k=20, ia_dist_seeds=100, ia_batch=10, seeds=(0, 1, 2),
                    halts=(1, 10, 30), pcas=(40, 60), ia_acc_seeds=tuple(range(10)), ref_seeds=(0, 1, 2), classes=10)
    points = plan.points()
    names = [p.file for p in points]
    assert len(names) == len(set(names))
    assert names[:6] == ["ia/k5-7-10-20_seeds000-009.json", "ia/k5-7-10-20_seeds010-019.json",
                         "untrained/untrained_seed0.json", "train/k5_halt-never_pca-none_seed0.json",
                         "train/k5_halt-1_pca-none_seed0.json", "supervised/supervised_seed0.json"]
    ia = [p for p in points if p.kind == "ia"]
    assert sum(p.v["seeds"] for p in ia if 5 in p.v["ks"]) == 100  # the distribution at K=5
    assert all(sum(p.v["seeds"] for p in ia if k in p.v["ks"]) == 20 for k in (7, 10, 20))
    train = [p.v for p in points if p.kind == "train"]
    for halt in (1, 10, 30, None):  # the halting table: 3 seeds a row
        assert sorted(v["seed"] for v in train if v["halt"] == halt and v["pca"] is None and v["k"] == 5) == \
            ([0, 1, 2] if halt is not None else list(range(10)))
    assert sum(1 for p in points if p.kind in ("untrained", "supervised")) == 6


@pytest.mark.timeout(900)
def test_reproduction_continues_from_its_results_and_refuses_foreign_ones(tmp_path):
    # 1. a first session measures two points, and leaves the rest pending in the write-up
    first = tool(tmp_path, "--max-points", "2")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert files(tmp_path) == ["ia/k5-10_seeds000-001.json", "untrained/untrained_seed0.json"]
    ia = json.loads((tmp_path / "results" / "ia" / "k5-10_seeds000-001.json").read_text())
    assert [(s["k"], s["seed"]) for s in ia["result"]["samples"]] == [(5, 0), (10, 0), (5, 1), (10, 1)]
    assert ia["fingerprint"]["config"]["train.cycles"] == 2 and ia["fingerprint"]["train_data"]["n"] == 1437
    writeup = (tmp_path / "results.md").read_text()
    assert "| untrained (random init) |" in writeup and "pending" in writeup
    # every network is probed twice: the protocol's settings, and the check probe at a tenth of its lr
    untrained = json.loads((tmp_path / "results" / "untrained" / "untrained_seed0.json").read_text())["result"]
    assert untrained["probe"]["settings"]["lr"] == 0.01 and untrained[ddp.CHECK_KEY]["settings"]["lr"] == ddp.CHECK_LR
    assert 0 < untrained[ddp.CHECK_KEY]["top1"] <= 1
    assert all(0 < untrained[key]["train_top1"] <= 1 for key in ("probe", ddp.CHECK_KEY))
    assert f"check probe, lr {ddp.CHECK_LR}" in writeup and "Over 1 networks the check probe minus" in writeup
    assert "| verdict, better-fitting probe |" in writeup

    # 2. the next session (only the files are left) skips them and runs the next point of the plan
    import shutil
    shutil.rmtree(tmp_path / "runs")
    second = tool(tmp_path, "--max-points", "1")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "2 of 8 points already" in second.stdout
    trained = tmp_path / "results" / "train" / "k5_halt-never_pca-none_seed0.json"
    assert "train/k5_halt-never_pca-none_seed0.json" in files(tmp_path) and len(files(tmp_path)) == 3
    row = json.loads(trained.read_text())["result"]
    assert row["cycles"] == 2 and row["clustering_cycles"] == 2 and 0 < row["probe"]["top1"] <= 1
    assert row["time_total_s"] > 0 and len(row["nmi_gt"]) == 2
    check = row[ddp.CHECK_KEY]
    assert check["settings"]["lr"] == ddp.CHECK_LR and check["layer"] == row["probe"]["layer"]

    # 2b. a point measured before the check probe existed gets it from its run's checkpoint (the same numbers),
    # and one whose run directory is elsewhere is named and keeps its result
    data = json.loads(trained.read_text())
    del data["result"][ddp.CHECK_KEY]
    del data["result"]["probe"]["train_top1"]  # (nor had results the probes' train top-1: read back from the run)
    trained.write_text(json.dumps(data))
    added = tool(tmp_path, "--max-points", "0")
    assert added.returncode == 0, added.stderr[-2000:]
    assert "added the check probe (lr 0.001) to train/k5_halt-never_pca-none_seed0.json" in added.stdout
    assert json.loads(trained.read_text())["result"] == row
    trained.write_text(json.dumps(data))
    run_dir = tmp_path / "runs" / "train" / "k5_halt-never_pca-none_seed0"
    run_dir.rename(tmp_path / "elsewhere")
    gone = tool(tmp_path, "--max-points", "0")
    assert gone.returncode == 0, gone.stderr[-2000:]
    assert "1 finished point(s) have no check probe and their networks are not in" in gone.stdout
    assert json.loads(trained.read_text()) == data
    assert "1 finished network(s) have no check probe yet" in (tmp_path / "results.md").read_text()
    (tmp_path / "elsewhere").rename(run_dir)

    # 3. a run that died: its JSON was never written and its last checkpoint is damaged; the point is run
    # again and gives the same numbers (nothing half-done is tabulated)
    trained.unlink()
    (tmp_path / "runs" / "train" / "k5_halt-never_pca-none_seed0" / "checkpoints" / "last.pt").write_bytes(b"junk")
    for ckpt in (tmp_path / "runs" / "train" / "k5_halt-never_pca-none_seed0" / "checkpoints").glob("*.pt"):
        ckpt.write_bytes(b"junk")
    third = tool(tmp_path, "--max-points", "1")
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    again = json.loads(trained.read_text())["result"]
    assert again["probe"]["top1"] == row["probe"]["top1"] and again["nmi_gt"] == row["nmi_gt"]

    # 4. a result measured under another setting is refused, naming the key, and never tabulated
    before = (tmp_path / "results.md").read_text()
    data = json.loads(trained.read_text())
    data["fingerprint"]["config"]["train.lr"] = 0.5
    trained.write_text(json.dumps(data))
    refused = tool(tmp_path, "--report-only")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.lr 0.5" in lines[0] and "k5_halt-never_pca-none_seed0.json" in lines[0]
    assert (tmp_path / "results.md").read_text() == before

    # 5. so is a file that is not a result of this tool
    trained.write_text("{not json")
    broken = tool(tmp_path, "--report-only")
    assert broken.returncode == 2 and "not a result file of this tool" in broken.stderr


def test_unknown_dataset_is_one_line():
    done = subprocess.run([sys.executable, str(TOOL), "--dataset", "cifar100"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'cifar100'" in done.stderr


def test_missing_idx_files_say_how_to_get_them(tmp_path):
    done = subprocess.run([sys.executable, str(TOOL), "--dataset", "fmnist", "--idx", str(tmp_path / "none"),
                           "--data", str(tmp_path / "data"), "--results", str(tmp_path / "r"), "--runs",
                           str(tmp_path / "runs")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode != 0 and "make data-fmnist" in done.stderr and "--idx" in done.stderr
    assert not (tmp_path / "r").exists()


def test_statistics_helpers():
    med, lo, hi = ddp.median_ci([0.30, 0.35, 0.38, 0.40, 0.41, 0.39, 0.37])
    assert med == 0.38 and lo <= med <= hi and lo >= 0.30 and hi <= 0.41
    r = ddp.spearman_ci([1, 2, 3, 4, 5, 6], [2, 4, 6, 8, 10, 12])
    assert r["rho"] == pytest.approx(1.0) and r["hi"] == pytest.approx(1.0)
    assert ddp.spearman_ci([1, 2, 3], [3, 2, 1])["rho"] is None  # too few points to say anything
    d, lo, hi = ddp.diff_ci([0.80, 0.81, 0.82], [0.78, 0.79, 0.80])
    assert d == pytest.approx(0.02) and lo <= d <= hi


def test_fetch_idx_without_root_or_apt_says_how_to_use_own_files(tmp_path):
    """`make data-fmnist` on a machine where Debian's package cannot be installed: one line on what to do."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool_name in ("id", "cat"):  # everything the script may call, but no apt-get
        (bin_dir / tool_name).symlink_to(f"/usr/bin/{tool_name}")
    done = subprocess.run(["/bin/bash", str(ROOT / "tools" / "fetch_idx.sh"), "fmnist"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60,
                          env={"PATH": str(bin_dir), "DCSCALE_FMNIST_IDX": str(tmp_path / "none")})
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert "cannot install Debian's dataset-fashion-mnist here" in line
    assert "dcscale shards fashion-mnist DIR --split train --out data/fmnist/train" in line
    wrong = subprocess.run(["/bin/bash", str(ROOT / "tools" / "fetch_idx.sh"), "cifar"], capture_output=True,
                           text=True, timeout=60)
    assert wrong.returncode == 2 and "expected 'fmnist' or 'mnist'" in wrong.stderr


class _RecordingRunner:
    """Stands in for `Runner` (which runs `dcscale` subprocesses, tested above): records the points."""

    def __init__(self, runs: Path):
        self.runs, self.nproc, self.ran = runs, 1, []

    def run(self, point):
        self.ran.append(point.file)
        return {"probe": {"top1": 0.5}}


def test_workers_side_by_side_skip_claimed_and_finished_points(tmp_path):
    """Two copies of the tool on one folder: a point claimed by a live worker is skipped, one whose
    worker died is taken over, one finished meanwhile is not run again; claims are released."""
    plan = ddp.Plan(k0=5, ia_ks=(5,), ia_seeds_per_k=0, ia_dist_seeds=0, ia_batch=1, seeds=(0,), halts=(1, 10),
                    pcas=(), ia_acc_seeds=(), ref_seeds=(0,), classes=10)
    points = [p for p in plan.points() if p.kind == "train"]  # never, halt 1, halt 10
    results = ddp.Results(tmp_path / "results", {"config": {"train.lr": 0.1}})
    claims = ddp.Claims(tmp_path / "runs")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for point, pid in ((points[0], live.pid), (points[1], dead.pid)):
            claims.path(point).parent.mkdir(parents=True, exist_ok=True)
            claims.path(point).write_text(f"{pid} {ddp.socket.gethostname()}\n")
        runner = _RecordingRunner(tmp_path / "runs")
        ran, missing = ddp.run_plan(points, results, runner)
        assert runner.ran == [points[1].file, points[2].file]  # the live worker's point skipped, the dead one's taken
        assert (ran, missing) == (2, 1)
        assert claims.path(points[0]).exists() and not claims.path(points[1]).exists()
        assert not claims.path(points[2]).exists()
    finally:
        live.kill()
        live.wait()
    # a pid now held by another process (a reboot since the claim, or reuse), an empty claim being written
    # and an empty one left long ago
    other = ddp.Claims(tmp_path / "other-runs")
    point = points[0]
    other.path(point).parent.mkdir(parents=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = ddp.socket.gethostname()
        other.path(point).write_text(f"{alive.pid} {host} {ddp.process_start(alive.pid)}\n")
        assert other.holder(point) == f"pid {alive.pid} on {host}"
        other.path(point).write_text(f"{alive.pid} {host} not-this-boot:1\n")
        assert other.holder(point) is None
    finally:
        alive.kill()
        alive.wait()
    other.path(point).write_text("")
    assert other.holder(point) == "a worker writing its claim"
    os.utime(other.path(point), (0, 0))
    assert other.holder(point) is None
    mine = ddp.Claims(tmp_path / "mine")  # the worker's own record matches a live process's start
    assert mine.me.split()[2] == ddp.process_start(os.getpid()) != "-"
    # the other worker finished its point meanwhile (it saved, then released its claim): nothing is left to run
    results.save(points[0], {"probe": {"top1": 0.5}}, {})
    claims.path(points[0]).unlink()
    runner = _RecordingRunner(tmp_path / "runs")
    assert ddp.run_plan(points, results, runner) == (0, 0) and runner.ran == []
    # a point finished by another worker after this one listed it is not run again
    results.path(points[2]).unlink()
    todo_then_done = _RecordingRunner(tmp_path / "runs")
    original_load, calls = results.load, []

    def load_seeing_a_late_finish(point):
        calls.append(point)
        if len(calls) == len(points) + 1:  # the re-check right after claiming: the other worker has saved it
            results.save(points[2], {"probe": {"top1": 0.5}}, {})
        return original_load(point)

    results.load = load_seeing_a_late_finish
    assert ddp.run_plan(points, results, todo_then_done) == (0, 0) and todo_then_done.ran == []
