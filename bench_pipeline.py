"""Core-minutes per stage of one seed of the CPU miniature (recipes/calibrate_smollm2.sh, attack a5e-4): before
(fp32, the code at --before-rev) and after (this tree, PRECISION=bf16's flags), for SFT, Vaccine and T-Vaccine.

    python bench_pipeline.py --before-rev <commit> --adapters runs/bf16 --out runs/pipeline

Every stage is the recipe's own command, run as a child process with one thread, on a slice of its work:
- align:  the first 10 steps (N_a 100, 1 epoch; the recipe runs 40). T-Vaccine refreshes P every K = 10 steps, so
          the slice holds the full run's share of importance passes.
- attack: 10 steps (100 samples, 1 epoch; the recipe runs 160), from the slice's aligned adapter.
- evaluations: 48 of the 200 HS prompts (and 24 of the 100 SST-2 rows after the attack), with the full run's
          adapters (--adapters: a folder holding align-<run>/ and attack-<run>-a5e-4/ of recipes/calibrate_smollm2.sh)
          so that answers have the lengths of the real ones; 48/200 = 24/100, one factor for both.
A stage's cost is the child's CPU time (user + system: core-seconds, which other jobs on the machine inflate far
less than wall time), scaled to the full stage: start-up (loading the model, data and adapters, measured apart
by a child that does only that) + the rest of the slice's CPU time x (full work / slice work). Both arms run interleaved, stage by stage, so they share the machine's
load. Each slice's output is kept in --out; a finished slice is read back, not rerun (resumable).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from reference import cpu_name

ALIGN = {"sft": "--method sft", "vaccine-r1": "--method vaccine --rho 1",
         "tvaccine-r1-g16": "--method tvaccine --rho 1 --gamma 16"}
METHOD_NAMES = {"sft": "SFT", "vaccine-r1": "Vaccine (rho 1)", "tvaccine-r1-g16": "T-Vaccine (rho 1, gamma 16)"}
ARMS = {"before": ("--dtype fp32", "--dtype fp32"),  # (training flags, evaluation flags): the recipe's PRECISION
        "after": ("--dtype bf16 --lora-math model", "--dtype bf16")}
SLICE_STEPS, FULL_ALIGN_STEPS, FULL_ATTACK_STEPS = 10, 40, 160
EVAL_FACTOR = 200 / 48  # = 100 / 24


def child_cpu_seconds(cmd: list[str], cwd: Path, log: Path) -> float:
    """Run cmd (one thread) and return its CPU time: user + system, from the kernel's accounting of children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measured(folder: Path, cmd: list[str], cwd: Path) -> float:
    """CPU seconds of cmd, whose output is `folder`; cached in folder/cpu_s.json (a rerun reads it back)."""
    record = folder / "cpu_s.json"
    if record.exists():
        return json.loads(record.read_text())["cpu_s"]
    folder.mkdir(parents=True, exist_ok=True)
    cpu = child_cpu_seconds(cmd, cwd, folder.with_suffix(".log"))
    record.write_text(json.dumps({"cpu_s": cpu, "cmd": cmd}))
    return cpu


def scaled(cpu: float, startup: float, factor: float) -> float:
    """A full stage's CPU time from its slice's: start-up once + the slice's work x (full work / slice work).
    CPU time, not the steps' wall time: on a loaded machine wall time counts the other jobs' turns too."""
    return startup + max(cpu - startup, 0.0) * factor


def stages(arm: str, run: str, out: Path, data: str, adapters: Path) -> dict[str, list[str]]:
    """The recipe's commands for one method, sliced; {stage: argv}. Paths are absolute: `before` runs elsewhere."""
    train, evaluate = (f.split() for f in ARMS[arm])
    o = out / arm / run
    common = ["--data-dir", data, "--max-len", "128", "--batch-size", "10", "--seed", "1", "--no-progress",
              "--overwrite", "--save-every", "0", *train]
    ev = ["--data-dir", data, "--judge", "rules", "--n-hs", "48", "--max-new-tokens-hs", "64", "--batch-size", "16",
          "--no-progress", "--seed", "1", *evaluate]
    full_aligned, full_attacked = adapters / f"align-{run}/adapter", adapters / f"attack-{run}-a5e-4/adapter"
    return {
        "align": [sys.executable, "tvaccine.py", *common, *ALIGN[run].split(), "--n-align", "100", "--n-harmful",
                  "100", "--epochs", "1", "--refresh-every", "10", "--resample-every", "2", "--out", str(o / "align")],
        "attack": [sys.executable, "attack.py", *common, "--task", "sst2", "--poison-ratio", "0.1",
                   "--n-harmful-defender", "100", "--samples", "100", "--epochs", "1", "--lr", "5e-4",
                   "--aligned", str(o / "align/adapter"), "--out", str(o / "attack")],
        "eval aligned": [sys.executable, "evaluate.py", *ev, "--task", "none", "--aligned", str(full_aligned),
                         "--out", str(o / "eval-aligned")],
        "eval attacked": [sys.executable, "evaluate.py", *ev, "--task", "sst2", "--n-fa", "24",
                          "--max-new-tokens-fa", "16", "--aligned", str(full_aligned), "--attacked",
                          str(full_attacked), "--out", str(o / "eval-attacked")],
    }


def startup_seconds(arm: str, out: Path, cwd: Path, adapters: Path, data: str) -> float:
    """CPU seconds to start evaluate.py's work: import, load the model, merge two adapters (no generation)."""
    dtype = ARMS[arm][1].split()[-1]
    code = ("import data, lora, model as m\nfrom trainer import DTYPES\n"
            f"data.load_safety('test', {data!r})\n"
            f"net, tok = m.load_model('smollm2-135m', dtype=DTYPES['{dtype}'], device='cpu')\n"
            f"for a in ['{adapters}/align-sft/adapter', '{adapters}/attack-sft-a5e-4/adapter']:\n"
            "    lora.load_adapter(net, a); lora.merge_and_unload(net)\n")
    return measured(out / arm / "startup", [sys.executable, "-c", code], cwd)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before-rev", required=True, help="git revision whose code is the `before` arm (run in fp32)")
    p.add_argument("--adapters", type=Path, required=True, help="a recipes/calibrate_smollm2.sh run folder (seed 1)")
    p.add_argument("--out", type=Path, default=Path("runs/pipeline"))
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--runs", default=",".join(ALIGN), help="of " + ", ".join(ALIGN))
    a = p.parse_args(argv)
    here = Path(__file__).resolve().parent
    out, adapters, data = a.out.resolve(), a.adapters.resolve(), str(Path(a.data_dir).resolve())
    before_tree = out / "before-tree"
    if not before_tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(before_tree), a.before_rev], cwd=here, check=True)
    trees = {"before": before_tree, "after": here}
    startup = {arm: startup_seconds(arm, out, trees[arm], adapters, data) for arm in ARMS}
    rows = []
    for run in a.runs.split(","):
        for stage in ("align", "attack", "eval aligned", "eval attacked"):
            cost = {}
            for arm in ARMS:  # interleaved: both arms of a stage back to back
                cmd = stages(arm, run, out, data, adapters)[stage]
                folder = out / arm / run / stage.replace(" ", "-")
                cpu = measured(folder, cmd, trees[arm])
                steps = {"align": FULL_ALIGN_STEPS, "attack": FULL_ATTACK_STEPS}
                factor = steps[stage] / SLICE_STEPS if stage in steps else EVAL_FACTOR
                cost[arm] = scaled(cpu, startup[arm], factor)
            rows.append((run, stage, cost["before"], cost["after"]))
            print(f"[pipeline] {run} {stage}: before {cost['before'] / 60:.1f}, after {cost['after'] / 60:.1f} "
                  "core-min", file=sys.stderr, flush=True)
    report(rows, a, startup)
    (out / "pipeline.json").write_text(json.dumps({"cpu": cpu_name(), "before_rev": a.before_rev, "rows": rows,
                                                   "startup_cpu_s": startup}, indent=1))


def report(rows, a, startup):
    print(f"## Core-minutes per stage, one seed of the miniature\n\n{cpu_name()}; one thread per stage; before = "
          f"fp32 at `{a.before_rev}`, after = this tree with the recipes' bf16 flags (training `{ARMS['after'][0]}`, "
          f"evaluation `{ARMS['after'][1]}`). Each stage: CPU time of a slice scaled to the full stage (see "
          f"bench_pipeline.py); start-up {startup['before']:.0f} / {startup['after']:.0f} s.\n")
    print("| method | stage | full work | before (core-min) | after (core-min) | after / before |\n|---|---|---|---|---|---|")
    work = {"align": f"{FULL_ALIGN_STEPS} steps", "attack": f"{FULL_ATTACK_STEPS} steps",
            "eval aligned": "200 HS prompts", "eval attacked": "200 HS + 100 SST-2"}
    for run, stage, b, f in rows:
        print(f"| {METHOD_NAMES[run]} | {stage} | {work[stage]} | {b / 60:.1f} | {f / 60:.1f} | {f / b:.2f}x |")
    total_b, total_f = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"| **all** | | | **{total_b / 60:.1f}** | **{total_f / 60:.1f}** | **{total_f / total_b:.2f}x** |\n")


if __name__ == "__main__":
    main()
