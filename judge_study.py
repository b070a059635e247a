"""The judge study: hand labels of saved answers, and how well each automatic HS judge agrees with them.

    python judge_study.py --study results/judge/labels.jsonl  # agreement and kappa of every candidate
    python judge_study.py --draw final runs/main/seed2/eval-*  # blind batches of those answers, to label
    python judge_study.py --merge                              # labels.jsonl from the labelled batches

The hand labels (results/judge/) were not made by people: each answer was read and labelled by a language model
following results/judge/LABELLING.md. The "first rater" labelled hand_labels.txt; each blind batch was labelled
by a rater that saw only the prompts and answers (no method, seed or attack), with 15 of the first rater's
answers hidden in it as gold items; a second, independent rater relabelled a sample (second_rater_*).

- Drawing and merging: `draw_answers`, `write_blind_batches`, `draw_blind` (`--draw`); `merge_labels`,
  `gold_agreement` (`--merge`).
- `study` (`--study`): agreement and Cohen's kappa of each candidate judge (judge.py's keyword and rules, and
  learned ones on SmolLM2's reading) on the hand labels, chosen on one half and reported on the other,
  ambiguous labels left out (LABELLING.md has the rule); `--per-model`: the HS by the hand labels of each
  evaluated model's sample, beside the rules and keyword judges'.

This file imports judge.py (the judges, and the label reading the probe shares), never the reverse.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data import in_split
from judge import (DEFAULT_FEATURE_CACHE, JUDGE_DIR, all_features, answer_part, choose_l2, eval_key, fit_probe,
                   harmful_verdicts, is_non_answer, load_labels, probe_predict)


def judge_verdicts(name: str, rows: list[dict]) -> list[bool]:
    """Judge `name`'s verdicts on labelled rows (keyword and rules: the judges that need no model)."""
    return harmful_verdicts(name, [r["prompt"] for r in rows], [r["answer"] for r in rows])[0]


# ----------------------------------------------------------------------------------------------------------------
# Agreement with hand labels


def cohen_kappa(a: list[bool], b: list[bool]) -> float:
    """Cohen's kappa for two binary raters: (p_o - p_e) / (1 - p_e)."""
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    p_e = pa * pb + (1 - pa) * (1 - pb)
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def agreement(verdicts: list[bool], labels: list[bool]) -> dict:
    n = len(labels)
    return {"n": n, "agreement": sum(v == l for v, l in zip(verdicts, labels)) / n,
            "kappa": cohen_kappa(verdicts, labels), "hs_judge": 100 * sum(verdicts) / n,
            "hs_labels": 100 * sum(labels) / n}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n, in percent (sound at small n and at 0 or n)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def per_model_table(rows: list[dict]) -> str:
    """Per evaluated model: the HS by the hand labels of its labelled sample (95% Wilson interval), next to
    what the rules and keyword judges say on the same answers, and how often each agrees with the labels."""
    lines = ["| evaluated model (source folder) | labels | HS, hand labels (95% interval) | HS, rules | HS, keyword | "
             "rules agrees | keyword agrees |", "|---|---|---|---|---|---|---|"]
    for source in dict.fromkeys(r["source"] for r in rows):
        rs = [r for r in rows if r["source"] == source and not r["ambiguous"]]
        truth = [r["label"] == "harmful" for r in rs]
        rules, keyword = judge_verdicts("rules", rs), judge_verdicts("keyword", rs)
        lo, hi = wilson_interval(sum(truth), len(rs))
        agree = lambda v: 100 * sum(a == b for a, b in zip(v, truth)) / len(rs)
        lines.append(f"| {Path(source).name} | {len(rs)} | {100 * sum(truth) / len(rs):.0f} ({lo:.0f}-{hi:.0f}) | "
                     f"{100 * sum(rules) / len(rs):.0f} | {100 * sum(keyword) / len(rs):.0f} | {agree(rules):.0f}% | "
                     f"{agree(keyword):.0f}% |")
    return "\n".join(lines)


def split_halves(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Choose on rows with an even `id`, report on the odd ones: ids were given in sampling order, which is
    stratified over the evaluated models, so both halves hold every model."""
    return [r for r in rows if r["id"] % 2 == 0], [r for r in rows if r["id"] % 2 == 1]


# ----------------------------------------------------------------------------------------------------------------
# Drawing answers to label


def draw_answers(eval_dirs: list[str], per_run: int | None, out: Path, seed: int = 0, split: str = "all",
                 first_id: int = 0) -> int:
    """Append HS answers of each evaluation folder to `out`, ids continuing the file's: `per_run` of them (a
    seeded random draw) or, with per_run None, every one, among the prompts of `split` (data.in_split)
    that were not drawn from that folder before. Ids start at first_id (another folder's answers take ids
    that cannot meet results/judge's, whose first-rater answers are hidden in every blind batch)."""
    import random
    rows = load_labels(out) if out.exists() else []
    next_id = max([first_id] + [r["id"] + 1 for r in rows])
    seen = {(eval_key(r["source"]), r["prompt_index"]) for r in rows}
    added = []
    for d in map(Path, eval_dirs):
        results = json.loads((d / "results.json").read_text())
        hs = [json.loads(l) for l in (d / "generations.jsonl").read_text().splitlines() if l.strip()]
        hs = [l for l in hs if l["kind"] == "hs"]
        todo = [i for i in range(len(hs)) if in_split(i, split) and (eval_key(d), i) not in seen]
        if per_run is not None:
            todo = sorted(random.Random(f"{seed}-{d.name}").sample(todo, min(per_run, len(todo))))
        for i in todo:
            added.append({"id": next_id, "source": str(d), "method": results.get("label") or results.get("method"),
                          "attacked": bool(results.get("adapters", {}).get("attacked")), "prompt_index": i,
                          "prompt": hs[i]["prompt"], "answer": hs[i]["answer"]})
            next_id += 1
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in added)
    return len(added)


def write_blind_batches(rows: list[dict], gold: list[dict], folder: Path, size: int = 150, n_gold: int = 15,
                        seed: int = 0) -> list[Path]:
    """Answers to label blind: shuffled across evaluated models, shown as numbered items (prompt, answer)
    with nothing that tells the method, the seed or whether the model was attacked. Each batch also holds
    `n_gold` answers the first rater labelled (not told apart), which measure each batch's rater against
    the first. batch-NN.jsonl is what the rater reads; key-NN.json maps its items to answer ids."""
    import random
    rng = random.Random(seed)
    rows, gold = rows[:], gold[:]
    rng.shuffle(rows)
    rng.shuffle(gold)
    folder.mkdir(parents=True, exist_ok=True)
    first = len(list(folder.glob("batch-*.jsonl")))
    paths = []
    for b, start in enumerate(range(0, len(rows), size), start=first):
        items = rows[start:start + size] + gold[:n_gold]
        gold = gold[n_gold:] + gold[:n_gold]  # the next batch gets other gold answers
        rng.shuffle(items)
        path = folder / f"batch-{b:02d}.jsonl"
        path.write_text("".join(json.dumps({"item": k, "prompt": r["prompt"], "answer": r["answer"]}) + "\n"
                                for k, r in enumerate(items)))
        (folder / f"key-{b:02d}.json").write_text(json.dumps({k: r["id"] for k, r in enumerate(items)}))
        paths.append(path)
    return paths


def blind_batches(folder: Path):
    """Per labelled blind batch: (its rater's name `blind-NN`, {item: answer id}, {item: (label, ambiguous)})
    from batch-NN.labels.txt (`item label [amb]` lines) and key-NN.json."""
    for path in sorted(folder.glob("batch-*.labels.txt")):
        b = path.name.split(".")[0].removeprefix("batch-")
        key = {int(k): v for k, v in json.loads((folder / f"key-{b}.json").read_text()).items()}
        yield f"blind-{b}", key, read_hand_labels(path)


def read_blind_labels(folder: Path) -> dict[int, tuple[str, bool, str]]:
    """{answer id: (label, ambiguous, rater)} from every labelled blind batch."""
    return {key[item]: (label, ambiguous, rater)
            for rater, key, labels in blind_batches(folder) for item, (label, ambiguous) in labels.items()}


def read_hand_labels(path: Path) -> dict[int, tuple[str, bool]]:
    """`id label [amb]` lines (ranges `a-b` allowed), label in r / h / o, as written while reading."""
    names = {"r": "refusal", "h": "harmful", "o": "off"}
    labels = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].split()
        if not line:
            continue
        first, last = (line[0].split("-") + [line[0]])[:2]
        for i in range(int(first), int(last) + 1):
            labels[i] = (names[line[1]], "amb" in line[2:])
    return labels


def merge_labels(answers: Path, hand: Path, out: Path, blind: Path | None = None) -> list[dict]:
    """answers.jsonl + hand_labels.txt (the first rater) [+ the blind batches' labels of answers the first
    rater did not label] -> labels.jsonl (each labelled answer with its label and rater)."""
    first = read_hand_labels(hand) if hand.exists() else {}  # another prompt set's folder has blind labels only
    labels = {i: (label, amb, "first") for i, (label, amb) in first.items()}
    if blind is not None:
        labels.update({i: v for i, v in read_blind_labels(blind).items() if i not in labels})
    rows = []
    for r in load_labels(answers):
        if r["id"] in labels:
            label, ambiguous, rater = labels[r["id"]]
            rows.append({**r, "label": label, "ambiguous": ambiguous, "rater": rater})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


PROMPT_SETS = ("advbench", "donotanswer", "harmbench")  # evaluation folders named eval-...-<set> (recipes/other_prompts*.sh)


def write_by_prompt_set(rows: list[dict], folder: Path) -> list[Path]:
    """`--merge --by-set`: labels-<set>.jsonl beside labels.jsonl, one per prompt set the evaluation folders name,
    so a judge can be trained on one set's labels and tested on another's (judge_tune.py --labels)."""
    paths, written = [], 0
    for name in PROMPT_SETS:
        some = [r for r in rows if Path(r["source"]).name.endswith("-" + name)]
        if some:
            path = folder / f"labels-{name}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in some))
            paths.append(path)
            written += len(some)
    if written != len(rows):
        raise ValueError(f"{folder}: some labelled answers come from no prompt set of {PROMPT_SETS}")
    return paths


def gold_agreement(labels: list[dict], blind: Path) -> dict[str, dict]:
    """Per blind batch: its rater's verdicts (harmful or not) on the first rater's answers hidden in it,
    against the first rater, on the answers neither marked ambiguous."""
    first = {r["id"]: r for r in labels if r.get("rater", "first") == "first"}
    report = {}
    for rater, key, theirs in blind_batches(blind):
        pairs = [(first[key[item]], label == "harmful") for item, (label, amb) in theirs.items()
                 if key[item] in first and not amb and not first[key[item]]["ambiguous"]]
        if pairs:
            report[rater] = agreement([theirs_harmful for _, theirs_harmful in pairs],
                                      [f["label"] == "harmful" for f, _ in pairs])
    return report


# ----------------------------------------------------------------------------------------------------------------
# The study: every candidate, chosen on one half, reported on the other


def candidate_verdicts(rows: list[dict], train: list[dict], features=None) -> dict[str, list[bool]]:
    """Each candidate's verdicts on `rows`; learned candidates are fitted on `train` only.
    features: {id: (probe feature vector, zero-shot margin)} for the learned candidates (None: rules only)."""
    out = {"keyword": judge_verdicts("keyword", rows), "rules": judge_verdicts("rules", rows)}
    if features is None:
        return out
    import torch
    X_tr = torch.stack([features[r["id"]][0] for r in train])
    m_tr = torch.stack([features[r["id"]][1] for r in train])
    X = torch.stack([features[r["id"]][0] for r in rows])
    m = torch.stack([features[r["id"]][1] for r in rows])
    y_tr = torch.tensor([r["label"] == "harmful" for r in train])
    # zero-shot: the model's own Yes/No, with the margin threshold that agrees best on the training half
    best = max(sorted(set(m_tr.tolist())), key=lambda t: int(((m_tr >= t) == y_tr).sum()))
    out["zero-shot"] = (m >= best).tolist()
    out["probe"] = probe_predict(fit_probe(X_tr, y_tr, l2=choose_l2(X_tr, y_tr)), X).tolist()
    non_answer = [is_non_answer(answer_part(r["answer"])) for r in rows]
    refused = [not harmful for harmful in out["rules"]]
    out["non-answer rule, then probe"] = [False if na else p for na, p in zip(non_answer, out["probe"])]
    out["rules, then probe"] = [False if na or rf else p for na, rf, p in zip(non_answer, refused, out["probe"])]
    return out


def study(labels_path: Path, with_model: bool, cache: Path | None = None, fresh_from: int | None = None) -> dict:
    """fresh_from: the first id of answers drawn after the judge was frozen; their held-out half is also
    reported on its own (answers nobody had read while writing the rules)."""
    labels = load_labels(labels_path)
    rows = [r for r in labels if not r["ambiguous"]]
    choose, held_out = split_halves(rows)
    features = all_features(rows, cache) if with_model else None
    report = {"n_labels": len(labels), "n_unambiguous": len(rows),
              "n_choose": len(choose), "n_held_out": len(held_out), "candidates": {}}
    on_choose = candidate_verdicts(choose, choose, features)  # learned ones: their fit on the training half
    on_held = candidate_verdicts(held_out, choose, features)
    truth_c = [r["label"] == "harmful" for r in choose]
    truth_h = [r["label"] == "harmful" for r in held_out]
    groups = sorted({_group(r) for r in held_out})
    for name in on_held:
        per_group = {}
        for g in groups:
            idx = [i for i, r in enumerate(held_out) if _group(r) == g]
            per_group[g] = agreement([on_held[name][i] for i in idx], [truth_h[i] for i in idx])
        report["candidates"][name] = {"choose": agreement(on_choose[name], truth_c),
                                      "held_out": agreement(on_held[name], truth_h), "per_model": per_group}
        if fresh_from is not None:
            idx = [i for i, r in enumerate(held_out) if r["id"] >= fresh_from]
            report["candidates"][name]["fresh_held_out"] = agreement([on_held[name][i] for i in idx],
                                                                     [truth_h[i] for i in idx])
    return report


def _group(row: dict) -> str:
    return f"{row['method']}, {'attacked' if row['attacked'] else 'before attack'}"


def study_table(report: dict) -> str:
    fresh = any("fresh_held_out" in r for r in report["candidates"].values())
    lines = ["| judge | agreement, choose half | kappa, choose half | agreement, held-out half | kappa, held-out "
             "half | HS judge / labels, held-out |" + (" agreement, fresh held-out |" if fresh else ""),
             "|---|---|---|---|---|---|" + ("---|" if fresh else "")]
    for name, r in report["candidates"].items():
        c, h = r["choose"], r["held_out"]
        line = (f"| {name} | {100 * c['agreement']:.1f}% | {c['kappa']:.2f} | {100 * h['agreement']:.1f}% | "
                f"{h['kappa']:.2f} | {h['hs_judge']:.1f} / {h['hs_labels']:.1f} |")
        if fresh:
            f = r["fresh_held_out"]
            line += f" {100 * f['agreement']:.1f}% (n={f['n']}) |"
        lines.append(line)
    return "\n".join(lines)


def rerate_batches(labels: list[dict], evaluations: list[str], folder: Path, size: int = 150) -> list[Path]:
    """`--rerate`: every labelled answer of the named evaluations (a source ending in the name, e.g.
    `main/seed2/eval-sft-a5e-4`) in blind batches for a second, independent reader, shuffled across the models and
    with no gold items (every answer already has its first label): how far two readers' HS of the same model lie
    apart is the floor under any judge measured against one of them."""
    chosen = [r for r in labels if any(r["source"].endswith(name.strip("/")) for name in evaluations)]
    missing = [name for name in evaluations if not any(r["source"].endswith(name.strip("/")) for r in chosen)]
    if missing:
        raise ValueError(f"no labelled answers of {missing}")
    return write_blind_batches(chosen, [], folder, size=size, n_gold=0, seed=len(chosen))


def hs_best_guess(rows: list[dict]) -> float:
    """The study's HS of labelled answers: `harmful` counted, ambiguous ones at their best-guess label."""
    return 100 * sum(r["label"] == "harmful" for r in rows) / len(rows)


def with_second_reading(labels: list[dict], folder: Path) -> list[dict]:
    """labels with each re-read answer's label replaced by its second reading (the reader named `rerate-NN`):
    report.py --hand-labels on it gives the study's figures as the second reader would have them."""
    second = read_blind_labels(folder)
    return [{**r, "label": second[r["id"]][0], "ambiguous": second[r["id"]][1],
             "rater": second[r["id"]][2].replace("blind", "rerate")} if r["id"] in second else r for r in labels]


def rerate_table(labels: list[dict], folder: Path) -> tuple[str, list[dict]]:
    """Per re-read model: its HS by the first labels and by the second reading (ambiguous at best guess both
    times), their gap, and the two readers' harmful-or-not agreement where both were sure."""
    second = read_blind_labels(folder)
    by_id = {r["id"]: r for r in labels}
    by_source = {}
    for i in second:
        by_source.setdefault(by_id[i]["source"], []).append(by_id[i])
    entries = []
    for source, first in by_source.items():
        again = [{**r, "label": second[r["id"]][0], "ambiguous": second[r["id"]][1]} for r in first]
        sure = [(a, b) for a, b in zip(first, again) if not a["ambiguous"] and not b["ambiguous"]]
        entries.append({"evaluation": "/".join(Path(source).parts[-3:]), "answers": len(first),
                        "hs_first": hs_best_guess(first), "hs_second": hs_best_guess(again),
                        "ambiguous_first": sum(r["ambiguous"] for r in first),
                        "ambiguous_second": sum(r["ambiguous"] for r in again),
                        "agreement_sure": sum((a["label"] == "harmful") == (b["label"] == "harmful")
                                              for a, b in sure) / max(len(sure), 1), "sure": len(sure)})
    lines = ["| evaluation | answers | HS first labels | HS second reading | gap | ambiguous (first / second) | "
             "agreement where both sure |", "|---|---|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: e["evaluation"]):
        lines.append(f"| {e['evaluation']} | {e['answers']} | {e['hs_first']:.1f} | {e['hs_second']:.1f} | "
                     f"{e['hs_second'] - e['hs_first']:+.1f} | {e['ambiguous_first']} / {e['ambiguous_second']} | "
                     f"{100 * e['agreement_sure']:.1f}% ({e['sure']}) |")
    gaps = [abs(e["hs_second"] - e["hs_first"]) for e in entries]
    if gaps:
        lines.append(f"\n{sum(g <= 3 for g in gaps)} of {len(gaps)} models within 3 points; largest gap "
                     f"{max(gaps):.1f}; mean |gap| {sum(gaps) / len(gaps):.1f}")
    return "\n".join(lines), entries


OTHER_FIRST_ID = 100_000  # answer ids of a --judge-dir other than results/judge start here


def draw_blind(split: str, eval_dirs: list[str], judge_dir: Path = JUDGE_DIR, size: int = 165,
               first_id: int | None = None) -> list[Path]:
    """`--draw`: every not-yet-drawn answer of `split` of each evaluation folder -> judge_dir/answers.jsonl, and
    blind batches of them (with 15 hidden first-rater answers of results/judge each) in judge_dir/blind, for a
    rater to label. A judge_dir other than results/judge keeps answers apart (e.g. another prompt set, which the
    tuned judge must never be trained on). `first_id` (default 0 there, OTHER_FIRST_ID elsewhere) keeps the ids of
    label files that are read together (judge_tune.py --labels) apart."""
    answers = judge_dir / "answers.jsonl"
    before = len(load_labels(answers)) if answers.exists() else 0
    if first_id is None:
        first_id = 0 if judge_dir == JUDGE_DIR else OTHER_FIRST_ID
    draw_answers(eval_dirs, None, answers, split=split, first_id=first_id)
    rows = load_labels(answers)[before:]
    labels = JUDGE_DIR / "labels.jsonl"
    gold = [r for r in (load_labels(labels) if labels.exists() else [])
            if not r["ambiguous"] and r.get("rater", "first") == "first"]
    return write_blind_batches(rows, gold, judge_dir / "blind", size=size, seed=before) if rows else []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", metavar="LABELS", help="labels.jsonl: agreement and kappa of every candidate")
    p.add_argument("--no-model", action="store_true", help="--study: rule-based candidates only")
    p.add_argument("--per-model", action="store_true", help="--study: also the HS by the hand labels of each "
                   "evaluated model's labelled sample, beside the judges'")
    p.add_argument("--out", default=None, help="--study: also write the report as JSON here")
    p.add_argument("--fresh-from", type=int, default=None, help="--study: first id drawn after the judge was "
                   "frozen (its held-out half is also reported alone)")
    p.add_argument("--feature-cache", default=str(DEFAULT_FEATURE_CACHE), help="--study: cache of the probe "
                   "features by label id ('' = none)")
    p.add_argument("--draw", nargs="+", metavar=("SPLIT", "DIR"), help="SPLIT (all, calib, final) and evaluation "
                   "folders: add their unlabelled answers to results/judge/answers.jsonl and write blind batches "
                   "(results/judge/blind/batch-NN.jsonl) for a rater (a language model under LABELLING.md), who writes "
                   "batch-NN.labels.txt")
    p.add_argument("--merge", action="store_true", help="rebuild results/judge/labels.jsonl from hand_labels.txt "
                   "and the blind batches' labels, and print each batch's agreement on its hidden answers")
    p.add_argument("--by-set", action="store_true", help="--merge: also labels-<set>.jsonl per prompt set (the "
                   "evaluation folder's -advbench / -donotanswer suffix)")
    p.add_argument("--judge-dir", type=Path, default=JUDGE_DIR, help="--draw/--merge: where answers, blind batches "
                   "and labels live (default results/judge; another folder keeps another prompt set apart)")
    p.add_argument("--batch-size", type=int, default=165, help="--draw: answers per blind batch (plus 15 hidden)")
    p.add_argument("--first-id", type=int, default=None, help="--draw: id of the first new answer (default 0 in "
                   f"results/judge, {OTHER_FIRST_ID} elsewhere; another start keeps label files read together apart)")
    p.add_argument("--rerate", nargs="+", metavar="EVAL", help="blind batches (judge-dir/rerate/) of every labelled "
                   "answer of these evaluations (e.g. main/seed2/eval-sft-a5e-4) for a second reader")
    p.add_argument("--rerate-report", action="store_true", help="each re-read model's HS by both readings")
    p.add_argument("--second-labels", type=Path, default=None, help="--rerate-report: also write labels.jsonl with "
                   "the re-read answers at their second reading here (for report.py --hand-labels)")
    args = p.parse_args(argv)
    judge_dir = args.judge_dir.resolve()
    if args.rerate or args.rerate_report:
        labels = load_labels(judge_dir / "labels.jsonl")
        if args.rerate:
            paths = rerate_batches(labels, args.rerate, judge_dir / "rerate", size=args.batch_size)
            print(f"[judge] {len(paths)} batches to re-read: " + ", ".join(str(path) for path in paths))
            return paths
        table, entries = rerate_table(labels, judge_dir / "rerate")
        print(table)
        if args.second_labels:
            rows = with_second_reading(labels, judge_dir / "rerate")
            args.second_labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if args.out:
            Path(args.out).write_text(json.dumps(entries, indent=2))
        return entries
    if args.draw:
        if len(args.draw) < 2:
            p.error("--draw SPLIT DIR [DIR ...]")
        paths = draw_blind(args.draw[0], args.draw[1:], judge_dir, size=args.batch_size, first_id=args.first_id)
        print(f"[judge] {len(paths)} blind batches: " + ", ".join(str(path) for path in paths))
        return paths or True
    if args.merge:
        rows = merge_labels(judge_dir / "answers.jsonl", judge_dir / "hand_labels.txt", judge_dir / "labels.jsonl",
                            judge_dir / "blind")
        first = rows if judge_dir == JUDGE_DIR else load_labels(JUDGE_DIR / "labels.jsonl")
        for batch, stats in gold_agreement(first, judge_dir / "blind").items():
            print(f"[judge] {batch}: {100 * stats['agreement']:.0f}% agreement on {stats['n']} hidden answers")
        print(f"[judge] {len(rows)} labels in {judge_dir / 'labels.jsonl'}")
        if args.by_set:
            for path in write_by_prompt_set(rows, judge_dir):
                print(f"[judge] {len(load_labels(path))} labels in {path}")
        return rows
    if not args.study:
        p.error("nothing to do: pass --study LABELS, --draw SPLIT DIR..., or --merge")
    report = study(Path(args.study), with_model=not args.no_model,
                   cache=Path(args.feature_cache) if args.feature_cache else None, fresh_from=args.fresh_from)
    print(study_table(report))
    if args.per_model:
        print("\n" + per_model_table(load_labels(args.study)))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
