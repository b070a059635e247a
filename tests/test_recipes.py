"""The study recipes' command lines, run with a stand-in `python` first on PATH that records each command and
writes the output file its stage is skipped on: which flags and row labels each run gets, and that a rerun
skips finished stages. Nothing is trained."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$RECIPE_LOG"
out=""; prev=""
for a in "$@"; do [ "$prev" = "--out" ] && out=$a; prev=$a; done
mkdir -p "$out" && touch "$out/summary.json" "$out/results.json"
"""


def run_recipe(tmp_path, recipe, **env):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    log = tmp_path / "commands.txt"
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECIPE_LOG": str(log),
                "OUT_ROOT": str(tmp_path / "pc"), "PRECISION": "bf16", **env}
    subprocess.run(["bash", str(ROOT / "recipes" / recipe)], env=full_env, check=True, capture_output=True)
    return log.read_text().splitlines() if log.exists() else []


def test_positive_control_flags_and_labels(tmp_path):
    cmds = run_recipe(tmp_path, "positive_control.sh", SEEDS="2", RUNS="sft tvaccine-r1-g16-attn tvaccine-r1-g8")
    align = [c for c in cmds if c.startswith("tvaccine.py")]
    assert len(align) == 3 and all("--n-align 1800" in c and "--seed 2" in c for c in align)
    assert all("--dtype bf16 --lora-math model" in c for c in align)
    authors = next(c for c in align if "align-tvaccine-r1-g16-attn" in c)
    assert "--gamma 16" in authors and "--freeze attention --harmful-batch-size 1" in authors
    paper = next(c for c in align if "align-tvaccine-r1-g8 " in c + " ")
    assert "--gamma 8" in paper and "--freeze" not in paper
    attacks = [c for c in cmds if c.startswith("attack.py")]
    assert len(attacks) == 3 and all("--lr 5e-4" in c and "--samples 400 --epochs 4" in c for c in attacks)
    evals = [c for c in cmds if c.startswith("evaluate.py")]
    assert len(evals) == 6 and all("--n-fa 200" in c for c in evals)
    labels = sorted({c.split("--label ")[1].split()[0] for c in evals})
    assert labels == ["sft", "tvaccine-r1-g16-attn", "tvaccine-r1-g8"]  # SFT by method, T-Vaccine by run
    assert str(tmp_path / "pc" / "seed2" / "eval-sft-a5e-4") in " ".join(evals)
    # every output exists now: a rerun runs nothing
    assert run_recipe(tmp_path, "positive_control.sh", SEEDS="2", RUNS="sft tvaccine-r1-g16-attn tvaccine-r1-g8") \
        == cmds
