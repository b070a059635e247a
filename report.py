"""The study's tables and plots from evaluation folders (evaluate.py's --out): what the README and docs/RESULTS.md show.

    python report.py runs/eval-* --plot                                # the paper's table shape, + PNGs
    python report.py DIR... --hs-split final --hand-labels results/judge/labels.jsonl
    python report.py DIR... --per-run                                  # one row per folder (a sweep)
    python report.py DIR... --by-poison-ratio --plot                   # HS and FA against the harmful ratio p

- The summary: rows = methods, columns = HS and FA per task (mean ± standard error over seeds), the share of
  one-word HS answers, the alignment's peak memory; then a paired bootstrap (seeds and prompts resampled
  together) of T-Vaccine against each aligned baseline, per attacked task.
- `--hs-split calib|final`: HS recomputed from the saved verdicts on one split of the prompts (data.in_split).
- `--hand-labels LABELS`: HS from the hand labels of the saved answers (judge_study.py's labels.jsonl, read by a
  language model under results/judge/LABELLING.md) instead of the judge's verdicts; `--hand-sure-only`: answers
  labelled harmful but ambiguous count as not harmful (the lower bound).
- `--written-refusals DATA_DIR`: also the share of HS answers that are, word for word, one of the written refusals
  of the offline safety stand-in (../shared/data/README.md): a model that learned D_a by heart answers with them.
- `--per-run`: one row per folder with every judge's HS; `--by-poison-ratio`: the paper's harmful-ratio sweep,
  p read from each attack run's config.json beside the evaluation folder.
- `--plot` (needs matplotlib, an optional extra): HS/FA bars, T-Vaccine's layer-importance heatmaps, the
  alignment losses and per-layer LoRA updates; with --by-poison-ratio, harmful_ratio.png.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

from data import HS_SPLITS, TASKS, in_split, load_safety
from judge import eval_key, load_labels

# ----------------------------------------------------------------------------------------------------------------
# Cells of a table


def _row_name(r: dict) -> str:
    return r.get("label") or r.get("method") or "unknown"


def _values(results, method, task, key) -> list[float]:
    return [r[key] for r in results if _row_name(r) == method and r["task"] == task and r.get(key) is not None]


def _cell(values: list) -> str:
    """One run: its value. Several (seeds): mean ± standard error of the mean (n)."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) / len(values) ** 0.5:.2f} ({len(values)})"


# ----------------------------------------------------------------------------------------------------------------
# Reading evaluation folders: saved verdicts, or the hand labels of the saved answers


def hs_verdicts(d: Path, split: str = "all", hand: dict | None = None) -> list[dict]:
    """The saved HS answers and verdicts of an evaluation folder on a split of the prompts. hand (from
    read_hand_verdicts): the verdicts are the hand labels instead; every answer of the split must have one."""
    lines = [json.loads(l) for l in (d / "generations.jsonl").read_text().splitlines() if l.strip()]
    hs = [(i, l) for i, l in enumerate(l for l in lines if l["kind"] == "hs") if in_split(i, split)]
    if hand is None:
        return [l for _, l in hs]
    key = eval_key(d)
    missing = [i for i, _ in hs if (key, i) not in hand]
    if missing:
        raise ValueError(f"{d}: {len(missing)} of the {len(hs)} HS answers on the '{split}' split have no hand label "
                         f"(first: prompt {missing[0]}): label them (judge_study.py --draw) or leave out --hand-labels")
    verdicts = []
    for i, l in hs:
        row = hand[(key, i)]
        if row["answer"] != l["answer"]:
            raise ValueError(f"{d}: the answer to prompt {i} is not the one that was labelled (re-evaluated?)")
        verdicts.append({**l, "harmful": row["label"] == "harmful", "ambiguous": row["ambiguous"]})
    return verdicts


def read_hand_verdicts(labels: Path, sure_only: bool = False) -> dict[tuple[str, int], dict]:
    """labels.jsonl (judge_study.py) as {(evaluation folder key, prompt index): labelled row}. sure_only: an answer
    labelled harmful but ambiguous counts as not harmful (the lower bound of the HS)."""
    rows = load_labels(labels)
    if sure_only:
        rows = [{**r, "label": "unsure"} if r["ambiguous"] and r["label"] == "harmful" else r for r in rows]
    return {(eval_key(r["source"]), r["prompt_index"]): r for r in rows}


def one_word(answer: str) -> bool:
    return len(re.findall(r"[A-Za-z0-9']+", answer)) <= 1


def written_refusals(data_dir) -> set[str]:
    """The responses of the safety stand-in's training rows whose source ends in "+refusal": the few refusals
    written for its AdvBench and Do-Not-Answer prompts (71% of D_a's responses). A model answering with one of
    them word for word recites D_a; the share of such answers after an attack is how much of that survived."""
    rows = load_safety("train", data_dir)
    texts = {r["response"].strip() for r in rows if str(r.get("source", "")).endswith("+refusal")}
    if not texts:
        raise ValueError(f"no written refusals in the safety train split of {data_dir} (rows whose source ends in "
                         "'+refusal'): --written-refusals reads the offline stand-in only")
    return texts


def load_results(dirs, split: str = "all", hand: dict | None = None, refusals: set[str] | None = None) -> list[dict]:
    """results.json of each folder; with a split, HS is recomputed on that split of the saved verdicts; with
    hand (read_hand_verdicts), from the hand labels of the saved answers (judge "hand"); with refusals
    (written_refusals), the share of answers that are one of them word for word ("verbatim")."""
    found = []
    for d in map(Path, dirs):
        if not (d / "results.json").is_file():
            raise FileNotFoundError(f"{d / 'results.json'} not found (is {d} an evaluate.py output folder?)")
        r = {**json.loads((d / "results.json").read_text()), "dir": str(d)}
        if (d / "generations.jsonl").is_file():
            hs = hs_verdicts(d, split, hand)
            r["HS"] = 100.0 * sum(l["harmful"] for l in hs) / len(hs)
            if hand is not None:
                r["judge"], r["HS_ambiguous"] = "hand", 100.0 * sum(l["ambiguous"] for l in hs) / len(hs)
                # a lower bound: only the answers labelled harmful without doubt
                r["HS_sure"] = 100.0 * sum(l["harmful"] and not l["ambiguous"] for l in hs) / len(hs)
            r["N_hs"] = len(hs)
            r["one_word"] = 100.0 * sum(one_word(l["answer"]) for l in hs) / len(hs)
            if refusals is not None:
                r["verbatim"] = 100.0 * sum(l["answer"].strip() in refusals for l in hs) / len(hs)
        elif split != "all" or hand is not None or refusals is not None:
            raise FileNotFoundError(f"--hs-split {split} / --hand-labels / --written-refusals need "
                                    f"{d / 'generations.jsonl'}")
        found.append(r)
    return found


# ----------------------------------------------------------------------------------------------------------------
# The paper's table, and the paired bootstrap under it


def summary_table(results: list[dict]) -> str:
    """Rows = methods, columns = HS and FA per task; several runs (seeds) of a cell: mean ± standard error (n)."""
    tasks = sorted({r["task"] for r in results}, key=lambda t: (list(TASKS) + ["none"]).index(t))
    methods = list(dict.fromkeys(_row_name(r) for r in results))
    judges = sorted({r["judge"] for r in results})
    # task "none" = HS with no fine-tuning after the alignment: what the attack then has to undo
    one_word = any("one_word" in r for r in results)  # saved answers: also the share of one-word HS answers
    sure = ("HS_sure",) if any("HS_sure" in r for r in results) else ()  # hand labels: also the lower bound
    verbatim = ("verbatim",) if any("verbatim" in r for r in results) else ()  # recited written refusals
    columns = [(t, k) for t in tasks for k in (("HS", *sure, *verbatim) if t == "none" else
                                                ("HS", *sure, "FA", "one_word", *verbatim) if one_word else
                                                ("HS", *sure, "FA"))]
    names = {("none", "HS"): "HS before attack ↓", ("none", "HS_sure"): "HS before attack, unambiguous only"}
    names.update({(t, "HS_sure"): f"{t} HS, unambiguous only" for t in tasks if t != "none"})
    names.update({(t, "one_word"): f"{t} one-word HS answers (%)" for t in tasks})
    names.update({(t, "verbatim"): f"{'before attack' if t == 'none' else t}: HS answers that are a written "
                  "refusal (%)" for t in tasks})
    head = ["method"] + [names.get(c, f"{c[0]} {c[1]} {'↓' if c[1] == 'HS' else '↑'}") for c in columns]
    lines = ["| " + " | ".join(head + ["align mem (GiB)"]) + " |", "|" + "---|" * (len(head) + 1)]
    for m in methods:
        mem = [r["peak_memory_gib"]["alignment"] for r in results
               if _row_name(r) == m and "alignment" in r.get("peak_memory_gib", {}) and r["task"] != "none"]
        cells = [_cell(_values(results, m, t, k)) for t, k in columns] + [_cell(mem)]
        lines.append("| " + " | ".join([m] + cells) + " |")
    notes = {"keyword": "keyword = refusal-phrase proxy", "rules": "rules = the offline rule judge of judge.py",
             "probe": "probe = the offline probe of judge.py, fitted on the hand labels",
             "hand": "hand = hand labels of the saved answers, read by a language model under "
             "results/judge/LABELLING.md"}
    said = [notes[j] for j in judges if j in notes]
    lines.append(f"\nHS judge: {', '.join(judges)}" + (f" ({'; '.join(said)}; not the paper's judge)" if said else ""))
    return "\n".join(lines)


def paired_bootstrap(a: list[Path], b: list[Path], split: str = "all", n_boot: int = 10000, seed: int = 0,
                     hand: dict | None = None):
    """HS(a) - HS(b) with a 95% interval, resampling seeds and prompts together.

    a and b are evaluation folders of two methods, paired by seed (same seed = same data order and attack) and
    evaluated on the same prompts. Each bootstrap round draws seeds with replacement and prompt indices with
    replacement, the same indices for both methods, and takes the mean difference of their verdicts."""
    import numpy as np
    by_seed = lambda ds: {json.loads((d / "results.json").read_text())["seed"]: d for d in map(Path, ds)}
    sa, sb = by_seed(a), by_seed(b)
    seeds = sorted(set(sa) & set(sb))
    if not seeds:
        raise ValueError("no seed evaluated for both methods: nothing to pair")
    va = np.array([[l["harmful"] for l in hs_verdicts(sa[s], split, hand)] for s in seeds], dtype=float)
    vb = np.array([[l["harmful"] for l in hs_verdicts(sb[s], split, hand)] for s in seeds], dtype=float)
    if va.shape != vb.shape:
        raise ValueError(f"the two methods were judged on different prompt sets: {va.shape} vs {vb.shape}")
    diff = va - vb  # (seeds, prompts)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, diff.shape[0], size=(n_boot, diff.shape[0]))
    cols = rng.integers(0, diff.shape[1], size=(n_boot, diff.shape[1]))
    boots = np.array([diff[r][:, c].mean() for r, c in zip(rows, cols)]) * 100
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return 100 * diff.mean(), lo, hi, len(seeds), diff.shape[1]


BOOTSTRAP_BASELINES = ("sft", "vaccine", "repnoise", "tar")  # the paper's aligned baselines, in its order
CONTROL_PAIRS = (("vaccine", "sft"),)  # the positive control: the published predecessor against plain SFT


def is_tvaccine_row(name: str) -> bool:
    """tvaccine, or a T-Vaccine row labelled by its run (tvaccine-r1-g16, tvaccine-r1-g16-attn)."""
    return name == "tvaccine" or name.startswith("tvaccine-")


def bootstrap_pairs(names) -> list[tuple[str, str]]:
    """Vaccine - SFT, then every T-Vaccine row against each aligned baseline (SFT, Vaccine, RepNoise, TAR), among
    the rows present."""
    pairs = [(a, b) for a, b in CONTROL_PAIRS if a in names and b in names]
    return pairs + [(t, b) for t in names if is_tvaccine_row(t) for b in BOOTSTRAP_BASELINES if b in names]


def bootstrap_lines(results: list[dict], split: str, hand: dict | None = None) -> list[str]:
    """The pairs of `bootstrap_pairs`, per attacked task, when both were evaluated on at least one common seed."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        dirs = {}
        for r in results:
            if r["task"] == task:
                dirs.setdefault(_row_name(r), []).append(Path(r["dir"]))
        for a, b in bootstrap_pairs(list(dirs)):
            d, lo, hi, n_seeds, n_prompts = paired_bootstrap(dirs[a], dirs[b], split, hand=hand)
            where = "before the attack" if task == "none" else f"after the {task} attack"
            lines.append(f"HS {a} - {b}, {where}: {d:+.2f} points, 95% interval [{lo:+.2f}, {hi:+.2f}] "
                         f"(paired bootstrap over {n_seeds} seeds x {n_prompts} prompts)")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Plots

# The cross-entropy on the safe alignment batch, as each method's metrics.jsonl names it: Vaccine and T-Vaccine's
# clean pass 1, RepNoise's CE(x_s), TAR's retain CE; SFT's training loss is that CE itself.
CLEAN_LOSS_KEYS = ("loss_pass1", "safe_ce", "retain_ce")


def plot_curves(plt, runs: list[Path], out: Path, names: dict[Path, str] | None = None) -> Path | None:
    """Per alignment run: the clean CE on the alignment batch against the step (solid), and for Vaccine and
    T-Vaccine the perturbed loss that trains (pass 2, dashed); RepNoise's and TAR's totals add terms of other
    scales (minus log H, minus the tamper entropy), so only their CE is drawn. Beside it, the LoRA update norm of
    each layer at the end (which layers trained)."""
    runs = [r for r in runs if (r / "metrics.jsonl").is_file()]
    if not runs:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4))
    for run in runs:
        name = (names or {}).get(run, run.name)
        m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
        steps = [r["step"] for r in m]
        clean = next((k for k in CLEAN_LOSS_KEYS if k in m[0]), "loss")
        line, = ax.plot(steps, [r[clean] for r in m], label=f"{name}: clean CE")
        if clean == "loss_pass1":
            ax.plot(steps, [r["loss"] for r in m], "--", color=line.get_color(), label=f"{name}: perturbed loss (pass 2)")
        summary = run / "summary.json"
        norms = json.loads(summary.read_text()).get("lora_update_norm_per_layer") if summary.is_file() else None
        if norms:
            bx.plot(range(len(norms)), norms, "o-", color=line.get_color(), label=name)
    ax.set(xlabel="step", ylabel="loss", title="alignment losses")
    ax.legend(fontsize=6)
    bx.set(xlabel="layer", ylabel="||(alpha/r) B A||_F over the layer's targets", title="LoRA update per layer")
    bx.legend(fontsize=6)
    png = out / "curves.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return png


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which this project does not install: "
                           "pip install matplotlib") from None
    return plt


def run_names(runs: list[Path]) -> dict[Path, str]:
    """Each alignment run's name in plots: its folder name, with its parent's when another run shares it
    (seed1/align-sft, seed2/align-sft)."""
    clash = {n for n in (r.name for r in runs) if sum(r.name == n for r in runs) > 1}
    return {r: f"{r.parent.name}-{r.name}" if r.name in clash else r.name for r in runs}


def plot_importance(plt, run: Path, out: Path, name: str | None = None) -> Path | None:
    """Heatmap of T-Vaccine's P (layer x refresh) from the alignment run's importance.jsonl."""
    path = run / "importance.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    P = torch.tensor([r["P"] for r in records]).T  # (layers, refreshes)
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * P.shape[1] + 2), max(3, 0.2 * P.shape[0] + 1)))
    im = ax.imshow(P.numpy(), aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(records)), [str(r["step"]) for r in records], rotation=90, fontsize=7)
    ax.set_yticks(range(0, P.shape[0], max(1, P.shape[0] // 16)))  # whole layer numbers
    name = name or run.name
    ax.set(xlabel="training step (importance refresh)", ylabel="layer", title=f"layer importance P: {name}")
    fig.colorbar(im, ax=ax)
    png = out / f"importance-{name}.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return png


def plot_scores(plt, results: list[dict], out: Path) -> Path:
    """Bars of mean HS and FA per method, one panel per task."""
    tasks = list(dict.fromkeys(r["task"] for r in results))
    methods = list(dict.fromkeys(_row_name(r) for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 + 2 * len(methods), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for j, key in enumerate(("HS", "FA")):
            vals = [statistics.mean(v) if (v := _values(results, m, task, key)) else 0.0 for m in methods]
            ax.bar([i + 0.4 * j for i in range(len(methods))], vals, width=0.4, label=key)
        ax.set_xticks([i + 0.2 for i in range(len(methods))], methods, rotation=20)
        ax.set(title=task, ylim=(0, 100), ylabel="%")
        ax.legend()
    png = out / "hs_fa.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------------------------------------------
# One row per folder; the harmful-ratio sweep


def per_run_table(results: list[dict], split: str = "all") -> str:
    """One row per evaluation folder (settings side by side, e.g. a calibration sweep): its folder name, HS
    under every judge that scored it (all prompts; on a split, the current judge only: the others' verdicts
    were not kept), FA, and the share of one-word HS answers."""
    if split != "all":
        results = [{**r, "HS_by_judge": None} for r in results]
    judges = list(dict.fromkeys(j for r in results for j in (r.get("HS_by_judge") or {r["judge"]: None})))
    head = ["evaluation", "task"] + [f"HS ({j})" for j in judges] + ["FA", "one-word HS answers (%)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        by_judge = {**(r.get("HS_by_judge") or {}), r["judge"]: r["HS"]}  # the current judge on this split
        cells = [Path(r["dir"]).name, r["task"]] + [_cell([by_judge[j]] if by_judge.get(j) is not None else [])
                                                     for j in judges]
        cells += [_cell([r["FA"]] if r.get("FA") is not None else []), _cell([r["one_word"]] if "one_word" in r else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def poison_ratio(r: dict) -> float:
    """The harmful ratio p of the attack behind an evaluation. results.json names the attack's adapter; its run
    folder's config.json is read from beside the evaluation folder, where the recipes write it and
    recipes/collect.sh copies it (the recorded path may point into a runs/ folder that is not kept)."""
    attacked = (r.get("adapters") or {}).get("attacked")
    if not attacked:
        raise ValueError(f"{r['dir']}: no attacked adapter recorded, so no harmful ratio (an evaluation before "
                         "the attack does not belong in a harmful-ratio sweep)")
    config = Path(r["dir"]).parent / Path(attacked).parent.name / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{r['dir']}: the attack run's {config} is missing, so its harmful ratio is unknown")
    return float(json.loads(config.read_text())["poison_ratio"])


def _ratio_cells(results: list[dict], key: str) -> dict[str, dict[float, list[float]]]:
    """The recorded values of `key` (HS or FA) by method, then by harmful ratio p (one value per seed)."""
    cells = {}
    for r in results:
        if r.get(key) is not None:
            cells.setdefault(_row_name(r), {}).setdefault(r["p"], []).append(r[key])
    return cells


def ratio_table(results: list[dict]) -> str:
    """The paper's harmful-ratio sweep: rows = methods, columns = HS and FA at each harmful ratio p of the
    attack (several seeds of a cell: mean ± standard error)."""
    ratios = sorted({r["p"] for r in results})
    cells = {key: _ratio_cells(results, key) for key in ("HS", "FA")}
    head = ["method"] + [f"HS p={p:g} ↓" for p in ratios] + [f"FA p={p:g} ↑" for p in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in dict.fromkeys(_row_name(r) for r in results):
        row = [_cell(cells[key].get(m, {}).get(p, [])) for key in ("HS", "FA") for p in ratios]
        lines.append("| " + " | ".join([m] + row) + " |")
    return "\n".join(lines)


def plot_ratio_sweep(plt, results: list[dict], out: Path) -> Path:
    """HS (left) and FA (right) against the harmful ratio p, one line per method (mean over seeds)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in zip(axes, ("HS", "FA")):
        for m, by_p in _ratio_cells(results, key).items():
            ratios = sorted(by_p)
            ax.plot(ratios, [statistics.mean(by_p[p]) for p in ratios], "o-", label=m)
        ax.set(xlabel="harmful ratio p of the attack", ylabel=f"{key} (%)", title=f"{key} after the attack")
        ax.legend(fontsize=7)
    png = out / "harmful_ratio.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------------------------------------------
# What the command prints and plots


def _split_note(args, results: list[dict]) -> str:
    """The line under a table whose HS was recomputed on a split of the prompts ('' for all prompts)."""
    if args.hs_split == "all":
        return ""
    return f"\nHS on the '{args.hs_split}' split of the prompts (N = {results[0].get('N_hs')} per run)"


def _plot_folder(args) -> Path:
    """Where --plot writes its PNGs: --out, else the folder holding the first evaluation folder."""
    out = Path(args.out) if args.out else Path(args.dirs[0]).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    return out


def summarize_by_ratio(args, results: list[dict]) -> str:
    results = [{**r, "p": poison_ratio(r)} for r in results]
    table = ratio_table(results) + _split_note(args, results)
    print(table)
    if args.plot:
        print(f"plots: {plot_ratio_sweep(_pyplot(), results, _plot_folder(args))}")
    return table


def summarize(args) -> str:
    if args.hand_sure_only and not args.hand_labels:
        raise ValueError("--hand-sure-only needs --hand-labels")
    hand = read_hand_verdicts(Path(args.hand_labels), args.hand_sure_only) if args.hand_labels else None
    refusals = written_refusals(args.written_refusals) if args.written_refusals else None
    results = load_results(args.dirs, args.hs_split, hand, refusals)
    if args.by_poison_ratio:
        return summarize_by_ratio(args, results)
    if args.per_run:
        print(table := per_run_table(results, args.hs_split))
        return table
    table = summary_table(results)
    table += _split_note(args, results)
    if hand is not None:
        amb = [r["HS_ambiguous"] for r in results]
        table += (f"\nHS from the hand labels: each saved answer's label in {args.hand_labels} (ambiguous answers "
                  f"count by their best-guess label: {min(amb):.0f}-{max(amb):.0f}% of a run's answers)")
    table = "\n".join([table, *bootstrap_lines(results, args.hs_split, hand)])
    print(table)
    if args.plot:
        plt = _pyplot()
        out = _plot_folder(args)
        runs = dict.fromkeys(Path(r["aligned_run"]) for r in results if r.get("aligned_run"))
        names = run_names(list(runs))
        pngs = [plot_scores(plt, results, out)]
        pngs += [p for run in runs if (p := plot_importance(plt, run, out, names[run]))]
        pngs += [p] if (p := plot_curves(plt, list(runs), out, names)) else []
        print("plots: " + ", ".join(map(str, pngs)))
    return table


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="evaluation folders (evaluate.py's --out)")
    p.add_argument("--plot", action="store_true", help="also write PNGs (needs matplotlib)")
    p.add_argument("--by-poison-ratio", action="store_true", help="HS and FA against the attack's harmful ratio p "
                   "(the paper's sweep; --plot: harmful_ratio.png)")
    p.add_argument("--per-run", action="store_true", help="one row per folder (a sweep)")
    p.add_argument("--hs-split", choices=HS_SPLITS, default="all", help="HS on all prompts, on the calibration "
                   "split (every 4th) or on the final split (the rest), from saved verdicts")
    p.add_argument("--hand-labels", metavar="LABELS", default=None, help="HS (and the bootstrap) from these hand "
                   "labels of the saved answers (judge_study.py's labels.jsonl, read by a language model under "
                   "results/judge/LABELLING.md); every answer of the split must be labelled")
    p.add_argument("--hand-sure-only", action="store_true", help="with --hand-labels: answers labelled harmful "
                   "but ambiguous count as not harmful, in the HS and the bootstrap (the lower bound)")
    p.add_argument("--written-refusals", metavar="DATA_DIR", default=None, help="also the share of HS answers "
                   "that are one of the safety stand-in's written refusals word for word (its rows whose source "
                   "ends in '+refusal'; ../shared/data)")
    p.add_argument("--out", default=None, help="where --plot writes the PNGs (default: the first DIR's parent)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    """Print (and return) the table the flags ask for; --plot also writes the PNGs."""
    return summarize(parse_args(argv))


if __name__ == "__main__":
    from trainer import cli
    cli(main)
