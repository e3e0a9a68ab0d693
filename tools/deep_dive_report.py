"""Tables, figures and the claim-by-claim write-up of a points reproduction (tools/deep_dive_points.py),
generated from the result files alone: whatever has been measured so far, with the rest marked pending."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deep_dive_points import (CHECK_KEY, CHECK_LR, Plan, Point, Results, diff_ci, mean_std, median_ci,
                              spearman_ci)

# What the paper states for Fashion-MNIST (Mustapha et al., 2022), claim by claim
PAPER_IA_RANGE = (0.37, 0.41)
DATASET_NAMES = {"fmnist": "full Fashion-MNIST", "digits": "scikit-learn's digits", "mnist-sample": "the MNIST sample"}


def collect(points: list[Point], results: Results) -> dict:
    """{kind: [(point, result dict)]} for the points measured so far."""
    out: dict[str, list] = {"ia": [], "train": [], "untrained": [], "supervised": []}
    for p in points:
        data = results.load(p)
        if data is not None:
            out[p.kind].append((p, data))
    return out


# Each accuracy is given by two probes of the same network (tools/deep_dive_points.py: CHECK_LR)
# and, per network, the one of the two that fits its own training set better (higher train top-1: chosen
# without the test set), the fairest reading of what the features hold
BEST = "best_fit"
PROBES = (("probe", "the protocol's probe (lr 0.01)"), (CHECK_KEY, f"the check probe (lr {CHECK_LR})"),
          (BEST, "the better-fitting probe of the two"))
CHECK_HEADER = f"check probe, lr {CHECK_LR} (mean ± std, runs)"
BEST_HEADER = "better-fitting probe (mean ± std, runs)"
CLAIMS = ("IA of a random network at K=5 lies in 0.37-0.41", "On FMNIST, accuracy falls as K grows",
          "On FMNIST, the K with the highest median IA is not the K with the best accuracy "
          "(no positive relation across K)",
          "Continuous clustering adds about one point of accuracy over halting early",
          "As the halting point moves later, accuracy first drops, then recovers",
          "On FMNIST, IA shows no positive relation with the final accuracy over initialisations")


def probe_of(row: dict, key: str) -> dict | None:
    """The row's probe `key`: the protocol's, the check probe, or (BEST) the one of the two with the higher
    train top-1; None where the row lacks it."""
    if key != BEST:
        return row.get(key)
    pair = [row.get("probe"), row.get(CHECK_KEY)]
    if not all(p and p.get("train_top1") is not None for p in pair):
        return None
    return max(pair, key=lambda p: p["train_top1"])


def top1s(rows: list[dict], key: str = "probe") -> list[float]:
    """The top-1 of each row's probe `key` (see probe_of), over the rows that have it."""
    return [p["top1"] for p in (probe_of(r, key) for r in rows) if p]


def probe_cells(rows: list[dict]) -> str:
    """The table cells of the check and the better-fitting probe."""
    return f"{_ms(top1s(rows, CHECK_KEY)) if rows else '-'} | {_ms(top1s(rows, BEST)) if rows else '-'}"


def k_claims(full: list) -> list[tuple[str, str, str, str]]:
    """The two claims over K from [(K, IA samples, accuracies)] (at least 3 K values)."""
    full = [(k, ia, acc) for k, ia, acc in full if acc]
    if len(full) < 3:
        return []
    found = []
    kr = spearman_ci([k for k, _, acc in full for _ in acc], [a for _, _, acc in full for a in acc])
    if kr["rho"] is not None:
        verdict = "agrees" if kr["hi"] < 0 else "does not agree" if kr["lo"] > 0 else "cannot tell"
        found.append((CLAIMS[1], verdict, f"Spearman of K against probe top-1 over {kr['n']} runs {kr['rho']:+.2f} "
                      f"(95% interval {kr['lo']:+.2f} to {kr['hi']:+.2f}); by K: " +
                      ", ".join(f"K={k} {100 * np.mean(acc):.1f}%" for k, _, acc in full), ""))
    rho = _median_rank_correlation(full)
    verdict = ("agrees" if rho["hi"] < 0.5 and rho["lo"] < 0 else "does not agree" if rho["lo"] > 0 else
               "cannot tell")
    found.append((CLAIMS[2], verdict, f"Spearman of median IA against median accuracy over K {rho['rho']:+.2f} "
                  f"({rho['lo']:+.2f} to {rho['hi']:+.2f})",
                  f"median IA against median accuracy over the {len(full)} K values: Spearman {rho['rho']:+.2f} "
                  f"(bootstrap 95% interval {rho['lo']:+.2f} to {rho['hi']:+.2f}, resampling the inits and runs "
                  f"of each K)"))
    return found


def halt_claims(acc: dict, halts: list) -> list[tuple[str, str, str, str]]:
    """The two halting claims from {halt_after: accuracies} (None: every cycle)."""
    never, once = acc.get(None, []), acc.get(1, [])
    if len(never) < 2 or len(once) < 2:
        return []
    d, lo, hi = diff_ci(never, once)
    verdict = "agrees" if lo > 0 and d < 0.03 else "does not agree" if hi < 0 or lo > 0.03 else "cannot tell"
    found = [(CLAIMS[3], verdict, f"every cycle minus cluster once: {100 * d:+.1f} points ({100 * lo:+.1f} to "
              f"{100 * hi:+.1f}), {len(never)} and {len(once)} runs",
              f"clustering every cycle against clustering once: {100 * d:+.1f} points of probe accuracy (bootstrap "
              f"95% interval {100 * lo:+.1f} to {100 * hi:+.1f}; {len(never)} and {len(once)} runs)")]
    if all(len(acc.get(h, [])) >= 2 for h in halts):
        seq = [np.mean(acc[h]) for h in halts]
        spread = max(np.std(acc[h], ddof=1) for h in halts)
        dips = min(seq[1:-1]) < seq[0] - spread and seq[-1] > min(seq[1:-1]) + spread
        flat = max(seq) - min(seq) < spread
        verdict = "agrees" if dips else ("cannot tell" if flat else "does not agree")
        found.append((CLAIMS[4], verdict, "mean probe top-1 by halt_after " + ", ".join(
            f"{'never' if h is None else h}: {100 * m:.1f}%" for h, m in zip(halts, seq)) +
            f" (largest std of a row {100 * spread:.1f})", ""))
    return found


def seed_claims(pairs: list[tuple[float, float]]) -> list[tuple[str, str, str, str]]:
    """The claim over initialisations from [(IA, accuracy)] of one K's seeds (at least 4)."""
    if len(pairs) < 4:
        return []
    sc = spearman_ci([ia for ia, _ in pairs], [a for _, a in pairs])
    if sc["rho"] is None:
        return []
    verdict = "does not agree" if sc["lo"] > 0 else "agrees" if sc["n"] >= 8 else "cannot tell"
    return [(CLAIMS[5], verdict, f"Spearman {sc['rho']:+.2f} ({sc['lo']:+.2f} to {sc['hi']:+.2f}) over {sc['n']} seeds",
             f"Spearman of IA against probe accuracy over {sc['n']} seeds: {sc['rho']:+.2f} (p={sc['p']:.2f}, "
             f"bootstrap 95% interval {sc['lo']:+.2f} to {sc['hi']:+.2f})")]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ms(values: list[float], scale: float = 100, digits: int = 1) -> str:
    """'mean ± std (n)' of values (scaled), or a single value, or pending."""
    if not values:
        return "pending"
    m, s = mean_std([scale * v for v in values])
    if len(values) == 1:
        return f"{m:.{digits}f} (1 run)"
    return f"{m:.{digits}f} ± {s:.{digits}f} ({len(values)})"


def ia_samples(got: dict) -> list[dict]:
    return [s for _, d in got["ia"] for s in d["result"]["samples"]]


def train_rows(got: dict, **match) -> list[dict]:
    """The finished training runs whose values match (k, halt, pca, seed)."""
    rows = []
    for p, d in got["train"]:
        v = p.v
        if all(v[key] == val for key, val in match.items()):
            m = d["measured"]
            # a run continued from an earlier invocation (its cycles took longer than this one's wall time)
            # mixes that invocation's seconds, possibly of other code
            resumed = m.get("wall_s", 0) < d["result"].get("time_total_s", 0)
            rows.append({**d["result"], "values": v, "current_seconds": bool(m.get("commit")) and not resumed})
    return rows


def mean_seconds(runs: list[dict], key: str) -> tuple[float, bool]:
    """The mean of `key` (seconds) over the runs measured in one go by code that records its commit
    (faiss's small k-means on one thread: the time a user gets), else over all; and whether it fell back (an upper
    bound: the earlier code spun faiss's threads on a shared core)."""
    current = [r for r in runs if r["current_seconds"]]
    return float(np.mean([r[key] for r in current or runs])), not current


def seconds_cell(runs: list[dict], key: str) -> str:
    value, upper_bound = mean_seconds(runs, key)
    return f"{value:.0f}{' *' if upper_bound else ''}"


def build(plan: Plan, points: list[Point], results: Results, dataset: str, config: str, command: str,
          figures_dir: Path, figures_rel: str) -> str:
    got = collect(points, results)
    n_done = sum(len(v) for v in got.values())
    samples = ia_samples(got)
    k0 = plan.k0
    lines: list[str] = []
    add = lines.append
    ia_claims: list[tuple[str, str, str]] = []  # (claim, verdict, evidence)
    claims_by_probe: dict[str, list] = {key: [] for key, _ in PROBES}  # (claim, verdict, evidence, sentence)

    measured = [d["measured"] for v in got.values() for _, d in v]
    fp = results.expected
    add(f"# The Deep Dive on {DATASET_NAMES.get(dataset, dataset)}: results\n")
    add(f"Generated by `{command}` from the {n_done} result files of {len(points)} points in "
        f"`{results.root.name}/` (one JSON per finished point; the tables fill in as points land). "
        f"Config `{config}`, {fp['world_size']} process(es); probe: `dcscale probe --protocol "
        f"{fp['probe']['protocol']} --layer {fp['probe']['layer']}`"
        f"{' (' + str(fp['probe']['epochs']) + ' epochs)' if fp['probe'].get('epochs') else ''}; "
        f"{fp['train_data']['n']:,} train / {fp['test_data']['n']:,} test images.")
    if measured:
        loads = [m["load_average_mean"] for m in measured]
        add(f"Measured {min(m['date'] for m in measured)} to {max(m['date'] for m in measured)} on "
            f"{measured[0]['cores']}-core CPU machines (torch {measured[0]['torch']}, faiss {measured[0]['faiss']}), "
            f"load average {min(loads):.1f}-{max(loads):.1f} while they ran: seconds compare within a table only "
            f"roughly (other jobs shared the cores).\n")
        unrecorded = "not recorded (code from before the commit field; see docs/deep_dive.md)"
        commits = sorted({m.get("commit") or unrecorded for m in measured})
        add(f"Code that measured them: {', '.join(commits)}. Points measured before commit 70fa634 ran faiss's "
            f"small k-means on every core of the machine (docs/threads.md: one thread since), so under load their "
            f"k-means seconds, and the clustering seconds of the halting table, are upper bounds (a 0.2 s k-means "
            f"took 1-15 s while another job held a core); accuracies, NMI and labels do not depend on it.\n")

    # ---- references
    add("## Reference rows: what the probe gives without DeepCluster\n")
    add(f"| network | probe top-1 % (mean ± std, runs) | {CHECK_HEADER} | {BEST_HEADER} |\n|---|---|---|---|")
    untrained = [d["result"] for _, d in got["untrained"]]
    supervised = [d["result"] for _, d in got["supervised"]]
    deepcluster = train_rows(got, k=k0, halt=None, pca=None)
    for label, runs in (("untrained (random init)", untrained),
                        (f"DeepCluster, K={k0}, clustering every cycle", deepcluster),
                        ("the same LeNet-5 trained on the true labels (`cluster.labels: ground_truth`, same schedule)",
                         supervised)):
        add(f"| {label} | {_ms(top1s(runs))} | {probe_cells(runs)} |")
    add("")

    # ---- 1. IA distribution
    add(f"## 1. Initial Alignment over random initialisations (K={k0})\n")
    ia0 = [s["ia"] for s in samples if s["k"] == k0]
    if ia0:
        med, lo, hi = median_ci(ia0)
        q1, q3 = np.percentile(ia0, [25, 75])
        add("| K | inits | median IA | 95% interval of the median (bootstrap) | IQR | min - max | mean ± std |")
        add("|---|---|---|---|---|---|---|")
        m, s = mean_std(ia0)
        add(f"| {k0} | {len(ia0)} | {med:.3f} | {lo:.3f} - {hi:.3f} | {q1:.3f} - {q3:.3f} | "
            f"{min(ia0):.3f} - {max(ia0):.3f} | {m:.3f} ± {s:.3f} |\n")
        add(f"![IA distribution]({figures_rel}/ia_distribution.png)\n")
        inside = PAPER_IA_RANGE[0] <= med <= PAPER_IA_RANGE[1]
        overlap = lo <= PAPER_IA_RANGE[1] and hi >= PAPER_IA_RANGE[0]
        verdict = "agrees" if inside else ("cannot tell" if overlap else "does not agree")
        ia_claims.append((f"IA of a random network at K={k0} lies in {PAPER_IA_RANGE[0]}-{PAPER_IA_RANGE[1]}", verdict,
                       f"median {med:.3f} (95% interval {lo:.3f}-{hi:.3f}, IQR {q1:.3f}-{q3:.3f}) over {len(ia0)} inits"))
    else:
        add("pending\n")

    # ---- 2. IA and accuracy against K
    add("## 2. IA and probe accuracy against K\n")
    add(f"| K | median IA (inits) | IA IQR | probe top-1 % (mean ± std, runs) | median probe top-1 % | "
        f"{CHECK_HEADER} | {BEST_HEADER} | final NMI |")
    add("|---|---|---|---|---|---|---|---|")
    by_k = []
    for k in plan.ia_ks:
        ia_k = [s["ia"] for s in samples if s["k"] == k]
        runs = train_rows(got, k=k, halt=None, pca=None)
        acc = top1s(runs)
        nmi = [r["final_nmi_gt"] for r in runs]
        if ia_k:
            q1, q3 = np.percentile(ia_k, [25, 75])
            ia_cells = f"{np.median(ia_k):.3f} ({len(ia_k)}) | {q1:.3f} - {q3:.3f}"
        else:
            ia_cells = "pending | -"
        add(f"| {k} | {ia_cells} | {_ms(acc)} | {_pct(float(np.median(acc))) if acc else '-'} | "
            f"{probe_cells(runs)} | {_ms(nmi, 1, 3) if nmi else '-'} |")
        by_k.append((k, ia_k, runs))
    add("")
    full = [(k, ia_k, runs) for k, ia_k, runs in by_k if ia_k and runs]
    if len(full) >= 3:
        add(f"![IA and accuracy against K]({figures_rel}/ia_accuracy_vs_k.png)\n")
        for key, name in PROBES:
            found = k_claims([(k, ia_k, top1s(runs, key)) for k, ia_k, runs in full])
            claims_by_probe[key] += found
            if found:
                add(f"With {name}: {found[-1][3]}.\n")
    else:
        add("The correlation over K waits for at least 3 K values with both IA and runs.\n")

    # ---- 3. halting
    add("## 3. Early clustering stop (`cluster.halt_after`)\n")
    add(f"| halt_after | clustering cycles | probe top-1 % (mean ± std, runs) | {CHECK_HEADER} | {BEST_HEADER} | "
        f"final NMI | total s | clustering s |")
    add("|---|---|---|---|---|---|---|---|")
    halt_rows = {}
    for h in [*plan.halts, None]:
        runs = train_rows(got, k=k0, halt=h, pca=None)
        halt_rows[h] = runs
        label = "never (every cycle)" if h is None else f"{h}{' (cluster once)' if h == 1 else ''}"
        if runs:
            add(f"| {label} | {runs[0]['clustering_cycles']} | {_ms(top1s(runs))} | {probe_cells(runs)} | "
                f"{_ms([r['final_nmi_gt'] for r in runs], 1, 3)} | {seconds_cell(runs, 'time_total_s')} | "
                f"{seconds_cell(runs, 'time_clustering_s')} |")
        else:
            add(f"| {label} | - | pending | - | - | - | - | - |")
    add("\nSeconds: the mean over the row's runs measured in one go by code that records its commit (faiss's small "
        "k-means on one thread); * where a row has no such run: earlier code, whose k-means spun threads on a shared "
        "core, or a run continued across code versions (upper bounds, above).\n")
    if any(halt_rows.values()):
        add(f"![early clustering stop]({figures_rel}/halt.png)\n")
    never, once = halt_rows.get(None, []), halt_rows.get(1, [])
    if len(never) >= 2 and len(once) >= 2:
        (once_s, once_old), (never_s, never_old) = (mean_seconds(r, "time_clustering_s") for r in (once, never))
        saved = (f"clustering once removes {100 * (1 - once_s / max(never_s, 1e-9)):.0f}% of the clustering time "
                 f"({once_s:.0f} s against {never_s:.0f} s a run)" if not (once_old or never_old) else
                 "the time it saves waits for runs of both rows measured in one go by the current code (*)")
        add(f"Halting saves time whatever the probe: {saved}.\n")
        for key, name in PROBES:
            found = halt_claims({h: top1s(runs, key) for h, runs in halt_rows.items()}, [*plan.halts, None])
            claims_by_probe[key] += found
            if found:
                add(f"With {name}: {found[0][3]}.\n")
    else:
        add("The difference waits for at least 2 runs of both rows.\n")

    # ---- 4. PCA
    add("## 4. PCA dimensions\n")
    add(f"| pca_dim | probe top-1 % (mean ± std, runs) | {CHECK_HEADER} | {BEST_HEADER} | IA (cycle 0) | total s | "
        f"clustering s |")
    add("|---|---|---|---|---|---|---|")
    for pdim in [None, *plan.pcas]:
        runs = train_rows(got, k=k0, halt=None, pca=pdim)
        label = "none (the config's)" if pdim is None else str(pdim)
        if runs:
            add(f"| {label} | {_ms(top1s(runs))} | {probe_cells(runs)} | {_ms([r['ia'] for r in runs], 1, 3)} | "
                f"{seconds_cell(runs, 'time_total_s')} | {seconds_cell(runs, 'time_clustering_s')} |")
        else:
            add(f"| {label} | pending | - | - | - | - | - |")
    add("")

    # ---- 5. IA against accuracy over seeds
    add(f"## 5. IA of a seed against its final accuracy (K={k0}, clustering every cycle)\n")
    seed_runs = sorted(train_rows(got, k=k0, halt=None, pca=None), key=lambda r: r["ia"])
    if seed_runs:
        add(f"| seed | IA | probe top-1 % | check probe top-1 %, lr {CHECK_LR} | better-fitting probe top-1 % | "
            f"final NMI |\n|---|---|---|---|---|---|")
        for r in seed_runs:
            check, best = (_pct(p["top1"]) if p else "-" for p in (r.get(CHECK_KEY), probe_of(r, BEST)))
            add(f"| {r['values']['seed']} | {r['ia']:.3f} | {_pct(r['probe']['top1'])} | {check} | {best} | "
                f"{r['final_nmi_gt']:.3f} |")
        add("")
        if len(seed_runs) >= 4:
            add(f"![IA against accuracy]({figures_rel}/ia_vs_accuracy.png)\n")
        for key, name in PROBES:
            pairs = [(r["ia"], probe_of(r, key)["top1"]) for r in seed_runs if probe_of(r, key)]
            found = seed_claims(pairs)
            claims_by_probe[key] += found
            if found:
                add(f"With {name}: {found[0][3]}.\n")
            else:
                add(f"With {name}: the correlation waits for at least 4 seeds ({len(pairs)} so far).\n")
    else:
        add("pending\n")

    # ---- probe check
    nets = [(p.name, d["result"]) for kind in ("train", "supervised", "untrained") for p, d in got[kind]]
    pairs = [(n, r["probe"]["top1"], r[CHECK_KEY]["top1"]) for n, r in nets if r.get(CHECK_KEY)]
    add("## The probe's learning rate\n")
    if pairs:
        gaps = [c - a for _, a, c in pairs]
        worst = sorted(pairs, key=lambda t: t[1] - t[2])[:3]
        fitted = [(n, probe_of(r, BEST) is r[CHECK_KEY]) for n, r in nets if probe_of(r, BEST)]
        add(f"Every network is probed twice: with the protocol's settings (the authors' lr 0.01, momentum 0.9, "
            f"unstandardised features) and at lr {CHECK_LR} (the check probe), everything else equal. Over "
            f"{len(pairs)} networks the check probe minus the protocol's is {100 * np.mean(gaps):+.1f} points on "
            f"average ({100 * min(gaps):+.1f} to {100 * max(gaps):+.1f}); the largest gaps: " +
            ", ".join(f"{n} {100 * a:.1f}% -> {100 * c:.1f}%" for n, a, c in worst) +
            ". A network whose protocol probe is far below its check probe did not lose its features: the probe's "
            "SGD oscillated (its train top-1 stays as low as its test top-1). Neither rate suits every network, so "
            "the *better-fitting probe* takes, network by network, the one of the two with the higher train top-1 "
            "(chosen without the test set)" +
            (f": the check probe on {sum(c for _, c in fitted)} of {len(fitted)} networks" if fitted else "") +
            ". Each claim below is judged with all three.\n")
        missing = len(nets) - len(pairs)
        if missing:
            add(f"{missing} finished network(s) have no check probe yet.\n")
    else:
        add("No network has its check probe yet.\n")

    # ---- claims
    add("## The paper's claims, one by one\n")
    add(f"| claim (Mustapha et al., 2022, on FMNIST) | verdict, protocol's probe (lr 0.01) | "
        f"verdict, check probe (lr {CHECK_LR}) | verdict, better-fitting probe | evidence |\n|---|---|---|---|---|")
    verdicts: dict[str, dict] = {}
    for key, _ in PROBES:
        for text, verdict, evidence, _sentence in claims_by_probe[key]:
            verdicts.setdefault(text, {})[key] = (verdict, evidence)
    for text, verdict, evidence in ia_claims:
        add(f"| {text} | **{verdict}** | **{verdict}** (no probe) | **{verdict}** (no probe) | {evidence} |")
    short = {"probe": "lr 0.01", CHECK_KEY: f"lr {CHECK_LR}", BEST: "better-fitting"}
    for text in CLAIMS[1:]:
        got_v = verdicts.get(text, {})
        cells = " | ".join(f"**{got_v[key][0]}**" if key in got_v else "**cannot tell yet**" for key, _ in PROBES)
        evidence = "; ".join(f"{short[key]}: {got_v[key][1]}" for key, _ in PROBES if key in got_v)
        add(f"| {text} | {cells} | {evidence or 'its points are not all measured'} |")
    add("")
    add("Verdict rules: a median inside the paper's range agrees, an interval outside it disagrees; a correlation or "
        "difference agrees when its bootstrap 95% interval excludes the other side, disagrees when it excludes the "
        "paper's side, and otherwise cannot tell; the claim of no positive relation over seeds agrees when, over at "
        "least 8 seeds, its interval reaches zero or below (the data show no positive relation, which is not proof "
        "of none). Where the probes disagree, the claim rests on the probe's optimisation, not on the features. "
        "Intervals from 3 runs are wide: they say how much the data can decide, not more.\n")
    extra = [s for s in plan.ia_acc_seeds if s not in plan.seeds]
    add(DIFFERENCES.format(seeds=", ".join(map(str, plan.seeds)), k0=k0, extra=", ".join(map(str, extra)) or "-",
                           n_k0=len(plan.seeds) + len(extra)))
    figures(plan, got, figures_dir)
    return "\n".join(lines) + "\n"


DIFFERENCES = """## Where this setting differs from the authors'

- **Threads and machine**: CPU only, one process with one thread (`OMP_NUM_THREADS=1`), no GPU; the authors
  ran on GPUs. Results do not depend on the thread count (dcscale's determinism), timings do.
- **k-means**: faiss's own k-means on one process (`cluster.kmeans: rank0`, 20 iterations, as the authors'
  `clustering.py` with faiss); dcscale's distributed k-means (the default) is not used here.
- **Probe**: `dcscale probe --protocol deepdive`, the authors' `linear_probe.py` on LeNet's conv2 (20 epochs),
  on the full train and test sets.
- **Cycles**: 49 training epochs, as `deep_clustering.py` runs for `n_cycles: 50`; the authors' halting sweep
  also has 50 and 100 of a longer run, not run here.
- **Seeds**: each row's runs use seeds {seeds} of dcscale's seeding (network init, sampler, k-means seeds all
  drawn from it), not the authors' RNG use; the row of K={k0} clustering every cycle also has the runs of section
  5's seeds {extra}, so its mean is over up to {n_k0} runs.
- **The supervised row** is ours: the same network, optimizer, schedule and uniform-over-classes sampler, trained
  on the true labels (`cluster.labels: ground_truth`).
"""


def _median_rank_correlation(full: list) -> dict:
    """Spearman of median IA against median accuracy over K, with a bootstrap interval that resamples
    each K's inits and runs."""
    from scipy import stats

    med_ia = [np.median(ia) for _, ia, _ in full]
    med_acc = [np.median(acc) for _, _, acc in full]
    rho = stats.spearmanr(med_ia, med_acc)[0]
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(2000):
        a = [np.median(rng.choice(ia, len(ia))) for _, ia, _ in full]
        b = [np.median(rng.choice(acc, len(acc))) for _, _, acc in full]
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            boot.append(stats.spearmanr(a, b)[0])
    lo, hi = np.percentile(boot, [2.5, 97.5]) if boot else (float("nan"), float("nan"))
    return {"rho": float(rho), "lo": float(lo), "hi": float(hi)}


# The accuracy figures show the protocol's probe and the better-fitting one (each run, and the mean)
SERIES = (("probe", "tab:green", "o", "protocol's probe (lr 0.01)"), (BEST, "tab:purple", "^", "better-fitting probe"))


def accuracy_series(ax, xs, groups: list[list[dict]]) -> None:
    """Each group's runs as points at its x, and the means as a line, for both probes of SERIES."""
    for key, color, marker, label in SERIES:
        means = []
        for x, runs in zip(xs, groups):
            acc = top1s(runs, key)
            ax.scatter([x] * len(acc), [100 * a for a in acc], color=color, marker=marker, s=18)
            means.append(100 * np.mean(acc) if acc else np.nan)
        ax.plot(list(xs), means, color=color, label=label)
    ax.legend(fontsize="small")


def figures(plan: Plan, got: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(name)

    samples = ia_samples(got)
    k0 = plan.k0
    ia0 = [s["ia"] for s in samples if s["k"] == k0]
    if ia0:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.hist(ia0, bins=min(20, max(5, len(ia0) // 5)), color="tab:blue", alpha=0.8)
        ax.axvspan(*PAPER_IA_RANGE, color="tab:orange", alpha=0.2, label="paper's range")
        ax.axvline(np.median(ia0), color="k", ls="--", label=f"median {np.median(ia0):.3f}")
        ax.set(xlabel="Initial Alignment (NMI)", ylabel="random inits", title=f"IA over {len(ia0)} inits, K={k0}")
        ax.legend(fontsize="small")
        save(fig, "ia_distribution.png")

    rows = []
    for k in plan.ia_ks:
        ia_k = [s["ia"] for s in samples if s["k"] == k]
        runs = train_rows(got, k=k, halt=None, pca=None)
        if ia_k and runs:
            rows.append((k, ia_k, runs))
    if len(rows) >= 2:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        ks = [r[0] for r in rows]
        axes[0].boxplot([r[1] for r in rows], showfliers=False)
        axes[0].set_xticks(range(1, len(ks) + 1), [str(k) for k in ks])
        axes[0].set(xlabel="K", ylabel="IA", title="IA against K")
        accuracy_series(axes[1], range(1, len(ks) + 1), [r[2] for r in rows])
        axes[1].set_xticks(range(1, len(ks) + 1), [str(k) for k in ks])
        axes[1].set(xlabel="K", ylabel="probe top-1 %", title="accuracy against K (each run, mean)")
        save(fig, "ia_accuracy_vs_k.png")

    halts = [*plan.halts, None]
    hrows = [(h, train_rows(got, k=k0, halt=h, pca=None)) for h in halts]
    hrows = [(h, r) for h, r in hrows if r]
    if hrows:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        labels = ["never" if h is None else str(h) for h, _ in hrows]
        accuracy_series(axes[0], range(len(hrows)), [runs for _, runs in hrows])
        axes[0].set_xticks(range(len(hrows)), labels)
        axes[0].set(xlabel="halt_after", ylabel="probe top-1 %", title="early clustering stop (each run, mean)")
        train_s = [mean_seconds(runs, "time_train_s")[0] for _, runs in hrows]
        clus_s = [mean_seconds(runs, "time_clustering_s")[0] for _, runs in hrows]
        axes[1].bar(labels, train_s, label="training")
        axes[1].bar(labels, clus_s, bottom=train_s, label="extract + k-means + assign")
        axes[1].set(xlabel="halt_after", ylabel="seconds per run", title="time")
        axes[1].legend(fontsize="small")
        save(fig, "halt.png")

    seed_runs = train_rows(got, k=k0, halt=None, pca=None)
    if len(seed_runs) >= 4:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for key, color, marker, label in SERIES:
            shown = [(r, probe_of(r, key)) for r in seed_runs if probe_of(r, key)]
            ax.scatter([r["ia"] for r, _ in shown], [100 * p["top1"] for _, p in shown], color=color, marker=marker,
                       label=label)
            for r, p in shown:
                ax.annotate(str(r["values"]["seed"]), (r["ia"], 100 * p["top1"]), fontsize=8)
        ax.legend(fontsize="small")
        ax.set(xlabel="IA of the seed (cycle 0)", ylabel="probe top-1 %", title=f"K={k0}: {len(seed_runs)} seeds")
        save(fig, "ia_vs_accuracy.png")
    return written
