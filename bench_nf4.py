"""Memory of the NF4 base (`--quantize nf4`, quant.py): bench.py section 1's rows at 7B, and the loading peak.

    python bench_nf4.py memory         # the 7B rows, bf16 vs NF4 base (ours), after the tracker's validation
    python bench.py --sections 1 --quantize nf4   # the same after section 1 (its bf16 rows reused)
    python bench_nf4.py loading        # peak host memory while loading a sharded checkpoint, dense vs NF4
    python bench_nf4.py steptime --seq-len 128   # SmolLM2 step time on the CPU, bf16 vs NF4 base
    python bench_nf4.py comparison     # recipes/nf4_smollm2.sh's runs (results/nf4) next to the fp32 main table

- `nf4_memory` (called by bench.section1 with --quantize nf4): the same tracker as section 1 (`memtrack.LiveBytes` on
  the `meta` device) over our stack with an NF4 base, first checked against real CPU runs of the same code (NF4
  weights quantised from random bf16 ones) and against the CPU allocator, and the tracked weight bytes against
  the NF4 layout's formula (uint8 codes + int8 scalers + fp32 factors and mean); then SFT, Vaccine and T-Vaccine
  at 7B next to the bf16 base's rows, and a fit over depth as section 1 does.
- `loading`: writes a random Llama checkpoint (~330 MiB bf16, 12 layers, 8 safetensors shards) and loads it in a
  fresh process per mode through model.build_from_tensors, sampling /proc/self/status every millisecond. Two kinds
  of resident memory: anonymous (what the process allocates: the model it keeps, the quantiser's scratch) and
  file-backed (the checkpoint's pages: safetensors memory-maps each shard and hands out tensors that are views of
  it, so a dense tensor kept as it is costs no copy, and the pages read stay resident while any tensor of that
  shard is alive; clean page cache, which the kernel can drop and re-read).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import quant
import reference
from memtrack import GiB, MiB, allocator_peak, gib, peak_memory, without_profiler_notes
from reference import LLAMA2_7B, lora_shapes, make_batch, spread
from model import ModelArgs, smollm2_gguf_path

METHODS = ("sft", "vaccine", "tvaccine")


def layer_weight_bytes(args: ModelArgs, dtype=torch.bfloat16) -> tuple[int, int]:
    """(bytes of every layer linear in NF4 by the layout's formula, bytes of everything else in `dtype`)."""
    size = torch.tensor([], dtype=dtype).element_size()
    nf4 = sum(quant.nf4_nbytes(i * o) for i, o in lora_shapes(args))
    dense = args.vocab_size * args.dim * (1 if args.tie_embeddings else 2) + args.dim * (2 * args.n_layers + 1)
    return nf4, dense * size


def validate(methods) -> None:
    """Real CPU runs with an NF4 base vs the same code on `meta`; the tracker vs the CPU allocator."""
    cases = [(ModelArgs(dim=256, n_layers=2, vocab_size=1024, n_heads=4, hidden_dim=688), 4, 48),
             (dataclasses.replace(LLAMA2_7B, n_layers=1), 2, 64)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("### Validation with an NF4 base: real CPU steps vs the same code on `meta`\n\nEach row: ours with and "
          "without checkpointing x the methods, 2 full steps each; NF4 weights quantised from random bf16 ones.\n")
    print("| config (dim x layers, B x T) | peaks, real CPU (MiB) | max meta vs real | tracker vs allocator "
          "(checkpointing) | weight bytes: tracked / NF4 formula |\n|---|---|---|---|---|")
    for args, B, T in cases:
        batch, harm = make_batch(B, T, args.vocab_size, 0), make_batch(B, T, args.vocab_size, 1)
        peaks, err_meta, err_alloc, weights = [], 0.0, 0.0, None
        for stack in ("ours", "ours-nockpt"):
            for m in methods:
                S = spread(args.n_layers, max(1, args.n_layers // 2)) if m == "tvaccine" else list(range(args.n_layers))
                real = peak_memory(stack, args, m, "cpu", S, batch, harm, profile=stack == "ours", quantize="nf4")
                meta = peak_memory(stack, args, m, "meta", S, batch, harm, quantize="nf4")
                peaks.append(real["peak"] / MiB)
                err_meta = max(err_meta, abs(meta["peak"] / real["peak"] - 1))
                err_alloc = max(err_alloc, abs(real["peak"] / real.get("allocator", real["peak"]) - 1))
                weights = real["weights"]
        formula = sum(layer_weight_bytes(args))
        print(f"| {args.dim} x {args.n_layers}, {B} x {T} | {min(peaks):.1f} - {max(peaks):.1f} | {100 * err_meta:.3f}% "
              f"| {100 * err_alloc:.2f}% | {weights} / {formula} B |")
    torch.set_num_threads(threads)
    reference.random_state.cache_clear()
    print()


def nf4_memory(a, res: dict) -> None:
    """The 7B rows with an NF4 base next to the bf16 ones of section 1 (`res`, computed here if absent)."""
    dev, L = ("meta" if a.device == "cpu" else a.device), LLAMA2_7B.n_layers
    methods = [m for m in METHODS if m in a.methods]
    batch, harm = make_batch(a.batch, a.seq_len, 32000, 0, False), make_batch(a.batch, a.seq_len, 32000, 1, False)
    print("## 1b. Peak memory at 7B with an NF4 base (`--quantize nf4`)\n")
    if dev == "meta":
        validate(methods)
    nf4, dense = {}, {}
    for m in methods:
        S = spread(L, 8) if m == "tvaccine" else list(range(L))
        for st in ("ours", "ours-nockpt"):
            nf4[m, st] = peak_memory(st, LLAMA2_7B, m, dev, S, batch, harm, quantize="nf4")
            dense[m, st] = res.get((m, st)) or peak_memory(st, LLAMA2_7B, m, dev, S, batch, harm)
    print(f"Same setting as the table above (batch {a.batch} x {a.seq_len}, LoRA r8 fp32 with AdamW state, 2 steps, "
          "T-Vaccine gamma 8 with S holding layer 0); the base's layer weights in NF4, dequantised to bf16 one "
          "layer at a time.\n")
    print("| method | bf16 base, checkpointing (GiB) | NF4 base, checkpointing (GiB) | bf16 base, no checkpointing "
          "(GiB) | NF4 base, no checkpointing (GiB) |\n|---|---|---|---|---|")
    for m in methods:
        cells = [gib(r[m, st]["peak"]) for st in ("ours", "ours-nockpt") for r in (dense, nf4)]
        print(f"| {m} | " + " | ".join(cells) + " |")
    w_nf4, w_rest = layer_weight_bytes(LLAMA2_7B)
    print(f"\nWeights: bf16 {gib(dense[methods[0], 'ours']['weights'])} GiB; NF4 base "
          f"{gib(nf4[methods[0], 'ours']['weights'])} GiB (layer linears {gib(w_nf4)} GiB in NF4, embeddings + "
          f"LM head + norms {gib(w_rest)} GiB in bf16).")
    if "tvaccine" in methods:
        tv = nf4["tvaccine", "ours"]
        print(f"NF4, T-Vaccine: importance pass {gib(tv['importance'])} GiB, the step {gib(tv['step'])} GiB. Target "
              f"T-Vaccine <= 7 GiB: {'met' if tv['peak'] <= 7 * GiB else 'NOT met'} ({gib(tv['peak'])} GiB).\n")
    if dev == "meta":
        depth_fit(methods, batch, harm, {m: nf4[m, "ours"]["peak"] for m in methods})


def depth_fit(methods, batch, harm, full: dict) -> None:
    """NF4, checkpointing: peaks at depths 2, 4, 8 fitted as a + b * layers, extrapolated to 32 layers."""
    depths, L = (2, 4, 8), LLAMA2_7B.n_layers
    print("Cross-check (NF4, checkpointing): depths 2, 4, 8 fitted as a + b * layers, extrapolated to 32:\n")
    print("| method | a (GiB) | b (MiB / layer) | extrapolated (GiB) | measured at 32 (GiB) | error |\n"
          "|---|---|---|---|---|---|")
    for m in methods:
        ys = [peak_memory("ours", dataclasses.replace(LLAMA2_7B, n_layers=d), m, "meta",
                          spread(d, d // 4 or 1) if m == "tvaccine" else list(range(d)), batch, harm,
                          quantize="nf4")["peak"] for d in depths]
        mx, my = statistics.mean(depths), statistics.mean(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(depths, ys)) / sum((x - mx) ** 2 for x in depths)
        pred = my + b * (L - mx)
        print(f"| {m} | {gib(my - b * mx)} | {b / MiB:.1f} | {gib(pred)} | {gib(full[m])} | "
              f"{100 * (pred / full[m] - 1):+.2f}% |")
    print()

# ----------------------------------------------------------------------------------------------------------------
# Step time on the CPU


def step_time(a) -> None:
    """SmolLM2-135M, bf16 vs NF4 base (dequantised to bf16): SFT and T-Vaccine steps, interleaved, median."""
    from lora import apply_lora, lora_parameters
    from model import load_model
    from tvaccine import layer_importance, sample_layers
    path = str(smollm2_gguf_path() or "smollm2-135m")
    models = {}
    for q in (None, "nf4"):
        m, _ = load_model(path, dtype=torch.bfloat16, device="cpu", quantize=q)
        torch.manual_seed(0)
        apply_lora(m, reference.RANK, reference.ALPHA, reference.DROPOUT, lora_dtype=torch.float32)
        models[q or "bf16"] = (m.train(), reference.make_optimizer(lora_parameters(m)))
    L, V = m.args.n_layers, m.args.vocab_size
    batch, harm = make_batch(a.batch, a.seq_len, V, 0), make_batch(a.batch, a.seq_len, V, 1)
    P = layer_importance(models["bf16"][0], harm)
    gen, times = torch.Generator().manual_seed(0), {}
    for r in range(1 + a.rounds):  # round 0 warms up and is dropped
        S = sample_layers(P, 16, gen)  # the recipe's gamma 16; the same S on both bases
        for m_name in ("sft", "tvaccine"):
            for base, (model, opt) in models.items():
                t0 = time.perf_counter()
                reference.ours_step(model, opt, m_name, batch, S if m_name == "tvaccine" else list(range(L)))
                if r:
                    times.setdefault((m_name, base), []).append(time.perf_counter() - t0)
    print(f"## Step time on the CPU: SmolLM2-135M, bf16 base vs NF4 base\n\n{torch.get_num_threads()} threads, batch "
          f"{a.batch} x {a.seq_len} right-padded, LoRA r8 fp32, no checkpointing; T-Vaccine gamma 16 (S drawn from "
          f"P, the same on both bases). Median of {a.rounds} interleaved rounds after a warmup round.\n")
    print("| method | bf16 base (s) | NF4 base (s) | NF4 / bf16 |\n|---|---|---|---|")
    for m_name in ("sft", "tvaccine"):
        b, n = (statistics.median(times[m_name, base]) for base in ("bf16", "nf4"))
        print(f"| {m_name} | {b:.2f} | {n:.2f} | {n / b:.2f}x |")
    print()

# ----------------------------------------------------------------------------------------------------------------
# The SmolLM2 comparison (recipes/nf4_smollm2.sh): one table from the run folders and the hand labels


def _hs(eval_dir: Path, hand: dict) -> tuple[float, float, float | None]:
    """HS by `rules` on all 200 prompts and on the calibration split (every 4th), and by hand on that split."""
    from judge import eval_key
    hs = [json.loads(l) for l in (eval_dir / "generations.jsonl").read_text().splitlines() if '"kind": "hs"' in l]
    calib = [i for i in range(len(hs)) if i % 4 == 0]
    labels = [hand.get((eval_key(eval_dir), i)) for i in calib]
    by_hand = 100 * sum(l == "harmful" for l in labels) / len(calib) if all(labels) else None
    return (100 * sum(h["harmful"] for h in hs) / len(hs), 100 * sum(hs[i]["harmful"] for i in calib) / len(calib),
            by_hand)


def comparison_runs(nf4: Path = Path("results/nf4"), fp32: Path = Path("results/cpu_smollm2/main")):
    """The committed runs: seed 1 of recipes/nf4_smollm2.sh in results/nf4, seeds 2-3 in results/nf4/seedN, and the
    fp32 main table's seeds as the reference (same recipe, CPU default dtype)."""
    runs = []
    for method, run in (("SFT", "sft"), ("T-Vaccine", "tvaccine-r1-g16")):
        for s in (1, 2, 3):
            runs.append((f"{method}, fp32 (main table), seed {s}", fp32 / f"seed{s}" / f"align-{run}",
                         fp32 / f"seed{s}" / f"eval-{run}-aligned"))
        for base in ("bf16", "nf4"):
            for s in (1, 2, 3):
                folder = nf4 if s == 1 else nf4 / f"seed{s}"
                if (folder / f"align-{run}-{base}").is_dir():
                    runs.append((f"{method}, {base} base, seed {s}", folder / f"align-{run}-{base}",
                                  folder / f"eval-{run}-{base}-aligned"))
    return runs


def mean_se(xs: list, digits: int) -> str:
    """Mean ± standard error over seeds of the values present ("-" when none; SE nan for one seed)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    se = statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan")
    return f"{statistics.mean(xs):.{digits}f} ± {se:.{digits}f}"


def comparison(runs: list[tuple[str, Path, Path]], label_files: list[Path]) -> None:
    """runs: (name, alignment folder, evaluation folder). Loss curve summaries, P, step time, HS; then per group
    (method, base) the mean and standard error over seeds. label_files: later files win (the blind relabel of
    results/nf4/judge over the first, unblinded reading of results/nf4/labels.jsonl)."""
    from judge import eval_key
    hand = {}
    for labels in label_files:
        hand.update({(eval_key(r["source"]), r["prompt_index"]): r["label"]
                     for r in map(json.loads, labels.read_text().splitlines())})
    print("| run | loss, steps 0-4 | loss, steps 30-39 | final loss | P_0 at steps 0/10/20/30 | median step (s) | "
          "HS rules, 200 | HS rules, calib 50 | HS by labels, calib 50 |\n|---|---|---|---|---|---|---|---|---|")
    groups = {}
    for name, align, ev in runs:
        m = [json.loads(l) for l in (align / "metrics.jsonl").read_text().splitlines()]
        loss = [x["loss"] for x in m]
        imp = align / "importance.jsonl"
        p0 = "/".join(f"{json.loads(l)['P'][0]:.3f}" for l in imp.read_text().splitlines()) if imp.exists() else "-"
        step = statistics.median(x["time_s"] for x in m)
        rules_all, rules_calib, by_hand = _hs(ev, hand)
        print(f"| {name} | {statistics.mean(loss[:5]):.3f} | {statistics.mean(loss[30:40]):.3f} | {loss[-1]:.3f} | "
              f"{p0} | {step:.1f} | {rules_all:.1f} | {rules_calib:.0f} | "
              f"{'-' if by_hand is None else f'{by_hand:.0f}'} |")
        groups.setdefault(name.rsplit(", seed", 1)[0], []).append((statistics.mean(loss[30:40]), by_hand))
    print("\n| method, base | seeds | loss, steps 30-39 (mean ± SE) | HS by labels, calib 50 (mean ± SE) |\n"
          "|---|---|---|---|")
    for group, values in groups.items():
        print(f"| {group} | {len(values)} | {mean_se([v[0] for v in values], 3)} | "
              f"{mean_se([v[1] for v in values], 1)} |")
    print()

# ----------------------------------------------------------------------------------------------------------------
# Loading peak


LOADING_MODEL = ModelArgs(vocab_size=8192, dim=1024, n_layers=12, n_heads=16, hidden_dim=2816)
SHARD_BYTES = 48 * MiB


def write_checkpoint(folder: Path, args: ModelArgs = LOADING_MODEL, seed: int = 0) -> int:
    """A random Llama checkpoint in HF names, bf16, in shards of <= SHARD_BYTES with an index; returns its bytes."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    kv = args.n_kv_heads * args.head_dim
    shapes = {"model.embed_tokens.weight": (args.vocab_size, args.dim)}
    for l in range(args.n_layers):
        p = f"model.layers.{l}."
        shapes.update({p + "self_attn.q_proj.weight": (args.dim, args.dim), p + "self_attn.k_proj.weight": (kv, args.dim),
                       p + "self_attn.v_proj.weight": (kv, args.dim), p + "self_attn.o_proj.weight": (args.dim, args.dim),
                       p + "mlp.gate_proj.weight": (args.hidden_dim, args.dim),
                       p + "mlp.up_proj.weight": (args.hidden_dim, args.dim),
                       p + "mlp.down_proj.weight": (args.dim, args.hidden_dim),
                       p + "input_layernorm.weight": (args.dim,), p + "post_attention_layernorm.weight": (args.dim,)})
    shapes.update({"model.norm.weight": (args.dim,), "lm_head.weight": (args.vocab_size, args.dim)})
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=g) * 0.02 if len(shape) > 1 else torch.ones(shape)).to(torch.bfloat16)
        if size + t.nbytes > SHARD_BYTES and current:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + t.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {"model_type": "llama", "vocab_size": args.vocab_size, "hidden_size": args.dim,
              "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
              "num_key_value_heads": args.n_kv_heads, "intermediate_size": args.hidden_dim, "rms_norm_eps": 1e-5}
    (folder / "config.json").write_text(json.dumps(config))
    return sum(t.nbytes for shard in shards for t in shard.values())


def _status() -> dict[str, int]:
    """RssAnon and RssFile of this process, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(line.split()[1]) * 1024
    return fields


class PeakSampler:
    """Peaks of RssAnon, RssFile and their sum, read every millisecond by a thread (torch ops release the GIL)."""

    def __enter__(self):
        import threading
        self.before, self.peak, self.running = _status(), {"RssAnon": 0, "RssFile": 0, "total": 0}, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while self.running:
            s = _status()
            s["total"] = s["RssAnon"] + s["RssFile"]
            self.peak = {k: max(v, s[k]) for k, v in self.peak.items()}
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    def growth(self) -> dict[str, int]:
        base = {**self.before, "total": self.before["RssAnon"] + self.before["RssFile"]}
        return {k: v - base[k] for k, v in self.peak.items()}


def load_once(folder: str, quantize: str | None) -> dict:
    """In this (fresh) process: peak growth of anonymous / file-backed / total RSS, time, bytes of the model."""
    import weights
    from model import ModelArgs as Args, build_from_tensors
    source = Path(folder)
    args = Args.from_hf(weights.read_config(source))
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with PeakSampler() as sampler, without_profiler_notes(), prof:
        t0 = time.perf_counter()
        model = build_from_tensors(args, weights.iter_tensors(weights.weight_files(source)), torch.bfloat16, "cpu",
                                   quantize=quantize)
        seconds = time.perf_counter() - t0
    held = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    return {**sampler.growth(), "torch": allocator_peak(prof), "seconds": seconds, "model": held}


def loading(threads: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        total = write_checkpoint(Path(tmp))
        files = sorted(Path(tmp).glob("*.safetensors"))
        print(f"## Loading peak: a random Llama (dim {LOADING_MODEL.dim}, {LOADING_MODEL.n_layers} layers, vocab "
              f"{LOADING_MODEL.vocab_size}), {total / MiB:.0f} MiB of bf16 in {len(files)} safetensors shards of "
              f"<= {SHARD_BYTES // MiB} MiB\n")
        print("Each mode in a fresh process (`model.build_from_tensors`, bf16 on the CPU). Peak live tensor bytes: "
              "torch's CPU allocations and frees (profiler), checkpoint tensors included; RSS: growth over the "
              "resident memory just before loading, sampled every millisecond.\n")
        print("| base | model held after loading (MiB) | peak live tensor bytes (MiB) | peak RSS anonymous (MiB) | "
              "peak RSS file-backed (MiB) | load time (s) |\n|---|---|---|---|---|---|")
        for quantize in (None, "nf4"):
            env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
            out = subprocess.run([sys.executable, __file__, "_load", tmp, quantize or "none"], capture_output=True,
                                 text=True, check=True, env=env).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {quantize or 'bf16'} | {r['model'] / MiB:.0f} | {r['torch'] / MiB:.0f} | {r['RssAnon'] / MiB:.0f} "
                  f"| {r['RssFile'] / MiB:.0f} | {r['seconds']:.1f} |")
        print()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["memory", "loading", "steptime", "comparison", "_load"], help="memory: the "
                   "7B rows; loading: the loading-peak table; steptime: SmolLM2 steps on the CPU, bf16 vs NF4; "
                   "comparison: the table of recipes/nf4_smollm2.sh's runs (results/nf4) with fp32's")
    p.add_argument("--rounds", type=int, default=3, help="steptime: timed rounds")
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="memory: cuda = max_memory_allocated")
    p.add_argument("--methods", default=",".join(METHODS), help="memory: of " + ", ".join(METHODS))
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=200, help="memory: 200 (the paper); steptime: use 128 (the recipe)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.what == "_load":  # the child process of `loading`
        folder, quantize = a.rest
        print(json.dumps(load_once(folder, None if quantize == "none" else quantize)))
    elif a.what == "memory":
        a.methods = a.methods.split(",")
        t0 = time.perf_counter()
        nf4_memory(a, {})
        print(f"Time: {(time.perf_counter() - t0) / 60:.1f} min.")
    elif a.what == "steptime":
        step_time(a)
    elif a.what == "comparison":
        comparison(comparison_runs(), [Path("results/nf4/labels.jsonl"), Path("results/nf4/judge/labels.jsonl")])
    else:
        loading(a.threads)


if __name__ == "__main__":
    main()
