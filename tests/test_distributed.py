"""Data parallelism (torchrun, gloo, 2 CPU processes) against the single-process run it must reproduce.

One torchrun launch (tests/dist_worker.py) runs SFT, Vaccine and T-Vaccine alignment (the latter also with
--freeze attention), a T-Vaccine run interrupted by a Ctrl-C that reaches one rank only and then resumed,
T-Vaccine with --fsdp (both freezing rules), the attack, the
evaluation, and runs that must be refused (RepNoise, TAR, batches that do not split); the same stages run here in
one process. Tiny random Llama, LoRA dropout 0, global batch 4 (2 rows per rank), 14 alignment
examples so that each epoch ends with a batch of 2 (1 row per rank), and answers of different lengths so that the
ranks hold different numbers of target tokens (the loss must be normalised by the global count).

Tolerance: the two runs compute the same sums in a different order (each rank's matmuls cover half the tokens,
the halves are added by the all-reduce, P and eps norms are square roots of summed squares), so they agree to
float32 rounding, not bitwise: about 1e-7 relative per operation, amplified a little by 8 AdamW steps. The LoRA
factors (|x| up to 0.13) must agree within 1e-6 absolute and 1e-4 relative to the largest entry of their tensor
(measured: at most 5e-8 absolute, 3e-5 relative on the smallest tensor); losses, grad norms and P within 1e-5
relative; the layer sets S and the evaluation's answers must be identical."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attack
import dist
import evaluate
import tvaccine
from conftest import tiny_hf_model, write_tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-6

ALIGN = ["--n-align", "14", "--n-harmful", "8", "--batch-size", "4", "--harmful-batch-size", "4", "--epochs", "2",
         "--max-len", "48", "--lora-dropout", "0", "--gamma", "2", "--refresh-every", "3", "--resample-every", "2",
         "--save-every", "2", "--no-progress"]
ATTACK = ["--task", "sst2", "--samples", "12", "--poison-ratio", "0.25", "--n-harmful-defender", "8",
          "--batch-size", "4", "--epochs", "1", "--lr", "1e-3", "--max-len", "128", "--lora-dropout", "0",
          "--no-progress"]
EVAL = ["--task", "sst2", "--judge", "keyword", "--n-hs", "6", "--n-fa", "5", "--batch-size", "2",
        "--max-new-tokens-hs", "6", "--max-new-tokens-fa", "4", "--no-progress"]
METHODS = ("sft", "vaccine", "tvaccine")
ALIGNMENTS = {**{m: ["--method", m] for m in METHODS},
              "tvaccine-attn": ["--method", "tvaccine", "--freeze", "attention"]}


def write_jsonl(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_data(folder: Path) -> Path:
    """Safety, SST-2 rows of the tiny tokenizer's words; answers of 1 to 9 words (unequal token counts)."""
    words = lambda i, n: " ".join(f"w{4 + (i * 7 + k) % 80}" for k in range(n))  # noqa: E731
    safety = [{"prompt": words(i, 3), "response": words(i + 1, 1 + i % 9), "is_safe": i < 20, "category": "x"}
              for i in range(32)]
    write_jsonl(folder / "safety" / "train.jsonl", safety)
    write_jsonl(folder / "safety" / "test.jsonl",
                [{"prompt": words(100 + i, 2 + i % 4), "response": "w5", "is_safe": False, "category": "x"}
                 for i in range(8)])
    sst2 = [{"sentence": words(200 + i, 2 + i % 5), "label": i % 2} for i in range(12)]
    write_jsonl(folder / "sst2" / "train.jsonl", sst2)
    write_jsonl(folder / "sst2" / "validation.jsonl", sst2)
    return folder


def stage_args(model, data, root: Path) -> list[tuple[str, str, list[str]]]:
    """(name, stage, argv) of every stage, writing under root."""
    common = ["--model", str(model), "--data-dir", str(data)]
    runs = [(name, "tvaccine", common + ALIGN + flags + ["--out", str(root / name)])
            for name, flags in ALIGNMENTS.items()]
    runs.append(("attack", "attack", common + ATTACK + ["--aligned", str(root / "tvaccine" / "adapter"),
                                                        "--out", str(root / "attack")]))
    # The base model: adapters trained here and there differ by float rounding, which could flip a greedy token.
    runs.append(("eval", "evaluate", common + EVAL + ["--out", str(root / "eval")]))
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every stage in one process (here) and in 2 gloo processes (one torchrun launch)."""
    tmp = tmp_path_factory.mktemp("dp")
    model = tmp / "model"
    tiny_hf_model("llama", layers=4).save_pretrained(model, safe_serialization=True)
    write_tiny_tokenizer(model, 96)
    data = write_data(tmp / "data")
    common = ["--model", str(model), "--data-dir", str(data)]

    spec = [{"stage": stage, "argv": argv} for _, stage, argv in stage_args(model, data, tmp / "dp")]
    cut = common + ALIGN + ["--method", "tvaccine", "--out", str(tmp / "dp" / "cut")]
    spec += [{"stage": "tvaccine", "argv": cut, "interrupt": [1, 3]},  # Ctrl-C on rank 1 in step 3
             {"stage": "tvaccine", "argv": cut + ["--resume"]},
             {"stage": "tvaccine", "argv": common + ALIGN + ["--method", "tvaccine", "--fsdp",
                                                            "--out", str(tmp / "dp" / "fsdp")]},
             {"stage": "tvaccine", "argv": common + ALIGN + ALIGNMENTS["tvaccine-attn"] + [
                 "--fsdp", "--out", str(tmp / "dp" / "fsdp-attn")]}]
    spec += [{"stage": "tvaccine", "refused": True, "argv": common + ALIGN + extra + ["--out", str(tmp / "dp" / name)]}
             for name, extra in (("repnoise", ["--method", "repnoise"]), ("tar", ["--method", "tar"]),
                                 ("odd", ["--method", "sft", "--batch-size", "3"]),
                                 ("last-batch", ["--method", "sft", "--n-align", "13"]))]
    (tmp / "runs.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(dist.free_port()), str(ROOT / "tests" / "dist_worker.py"), str(tmp / "runs.json"),
         str(tmp / "record.json")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the single-process reference, while torchrun's processes start
    try:
        for _, stage, argv in stage_args(model, data, tmp / "one"):
            {"tvaccine": tvaccine.main, "attack": attack.main, "evaluate": evaluate.main}[stage](argv)
    finally:
        torch.set_num_threads(threads)
    out, _ = launch.communicate(timeout=240)
    assert launch.returncode == 0, out[-4000:]
    return {"one": tmp / "one", "dp": tmp / "dp", "record": json.loads((tmp / "record.json").read_text()),
            "log": out}


def adapter(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def metrics(folder: Path) -> list[dict]:
    return [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_adapters_close(one: dict, dp: dict):
    assert one.keys() == dp.keys()
    for k in one:
        diff, largest = (one[k] - dp[k]).abs().max().item(), one[k].abs().max().item()
        assert diff <= ATOL and diff <= 1e-4 * largest, f"{k}: |one - dp| = {diff:.2e} (largest {largest:.2e})"


@pytest.mark.parametrize("method", ALIGNMENTS)
def test_data_parallel_alignment_equals_one_process(runs, method):
    one, dp = runs["one"] / method, runs["dp"] / method
    assert_adapters_close(adapter(one), adapter(dp))
    m1, m2 = metrics(one), metrics(dp)
    assert len(m1) == len(m2) == 8  # rank 0 logs every step once
    for a, b in zip(m1, m2):
        assert a.get("layers") == b.get("layers")
        for key in ("loss", "loss_pass1", "grad_norm"):  # global losses and the global (clipped) norm
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a["step"])
    summary = json.loads((dp / "summary.json").read_text())
    assert summary["processes"] == 2 and "max over 2 processes" in summary["peak_memory_kind"]
    assert json.loads((dp / "config.json").read_text())["world_size"] == 2


def test_every_rank_samples_the_same_layers_as_one_process(runs):
    per_rank = runs["record"]["sampled_layers"]
    assert runs["record"]["world_size"] == 2 and len(per_rank) == 2
    assert per_rank[0] == per_rank[1] and per_rank[0]
    one = [m["layers"] for m in metrics(runs["one"] / "tvaccine")]
    assert [m["layers"] for m in metrics(runs["dp"] / "tvaccine")] == one
    P = lambda f: [l["P"] for l in map(json.loads, (f / "importance.jsonl").read_text().splitlines())]  # noqa
    for p1, p2 in zip(P(runs["one"] / "tvaccine"), P(runs["dp"] / "tvaccine"), strict=True):
        assert p2 == pytest.approx(p1, rel=1e-5)


def test_ctrl_c_on_one_rank_then_resume_continues_exactly(runs):
    dp = runs["dp"]
    ck = torch.load(dp / "cut" / "checkpoint.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng_per_rank"]) == 2 and ck["step"] == 8
    full, resumed = adapter(dp / "tvaccine"), adapter(dp / "cut")
    for k in full:
        assert torch.equal(full[k], resumed[k]), k  # same processes, same sums: bitwise
    assert [m["step"] for m in metrics(dp / "cut")] == list(range(8))
    assert "interrupted after step 3" in runs["log"]


@pytest.mark.parametrize("run, fsdp_run", [("tvaccine", "fsdp"), ("tvaccine-attn", "fsdp-attn")])
def test_fsdp_tvaccine_equals_one_process(runs, run, fsdp_run):
    """The base weights sharded over the 2 ranks (FSDP2 on gloo), LoRA whole and data parallel; with --freeze
    attention pass 2's backward runs through every layer's FSDP units."""
    one, fsdp = runs["one"] / run, runs["dp"] / fsdp_run
    assert_adapters_close(adapter(one), adapter(fsdp))
    assert [m["layers"] for m in metrics(fsdp)] == [m["layers"] for m in metrics(one)]
    assert json.loads((fsdp / "summary.json").read_text())["fsdp"] is True


def test_fsdp_shards_every_base_weight_and_leaves_lora_whole(runs):
    """What dist.shard_model does on 2 ranks is what bench.py's FSDP memory estimate assumes."""
    import bench
    from dist_worker import FSDP_MODEL
    from model import ModelArgs
    args = ModelArgs(**FSDP_MODEL)
    layout = bench.fsdp_layout(args, torch.float32)
    ranks = runs["record"]["fsdp_layout"]
    assert all(r["all_base_sharded"] and r["lora_whole_and_trainable"] for r in ranks)
    assert all(r["units"] == 2 * args.n_layers + 1 for r in ranks)  # attention + MLP per layer, and the root
    assert [r["local_bytes"] for r in ranks] == [layout["total"] // 2] * 2  # even shapes: exact halves


def test_what_cannot_be_split_over_ranks_is_refused(runs):
    repnoise, tar, odd, last = runs["record"]["refusals"]
    assert "--method repnoise runs in one process only" in repnoise and "--method tar" in tar
    assert "--batch-size 3 is not divisible by the 2 processes" in odd
    assert "13 examples, so the last batch of each epoch holds 1 row(s): fewer than the 2 processes" in last


def test_fsdp_needs_torchrun(tmp_path):
    with pytest.raises(ValueError, match="torchrun"):
        tvaccine.main(["--model", "unused", "--out", str(tmp_path / "x"), "--fsdp"])


def test_data_parallel_attack_equals_one_process(runs):
    assert_adapters_close(adapter(runs["one"] / "attack"), adapter(runs["dp"] / "attack"))


def test_evaluation_answers_equal_one_process_in_order(runs):
    one = (runs["one"] / "eval" / "generations.jsonl").read_text()
    dp = (runs["dp"] / "eval" / "generations.jsonl").read_text()
    assert len(one.splitlines()) == 11
    assert dp == one
    r1, r2 = (json.loads((runs[k] / "eval" / "results.json").read_text()) for k in ("one", "dp"))
    assert (r1["HS"], r1["FA"]) == (r2["HS"], r2["FA"])
