"""The product on one CUDA GPU, checked in one command (issue 24): random weights of the real shapes, no download.

    python gpu_check.py OUT_DIR                  # one GPU, within --budget-s (default 420 s)
    python gpu_check.py --tiny OUT_DIR           # the same code paths on the CPU with tiny shapes (CI: seconds)

Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (rewritten after every section, so a killed run leaves
what it had), with the device, the versions and four sections:

1. correctness: our Llama-2 against transformers' LlamaForCausalLM (logits, 4 layers at 7B width) and one SFT /
   Vaccine / T-Vaccine step against the HF + peft reference step (reference.py), each run four ways (ours and the
   reference, bf16 and fp32) over the same bf16 weights: fp32 shows that the maths agree, bf16 that the rounding
   is no worse than the reference's own. The tolerances, and why they hold: docs/GPU.md.
2. memory: torch.cuda.max_memory_allocated of two full steps of SFT, Vaccine, T-Vaccine, RepNoise and TAR at
   Llama-2-7B shapes, batch 10 x 200, with and without activation checkpointing, next to the prediction of
   memtrack.py's tracker (the same case on the `meta` device); on the CPU the allocator's own peak stands in.
3. speed: step times of ours against the reference (with and without HF's checkpointing) at 7B, and generation
   tokens/s of generate.py against transformers' generate.
4. distributed: two T-Vaccine steps through trainer.train under torchrun (NCCL on GPUs, gloo on the CPU), data
   parallel and FSDP, against the same steps in one process.

Each section and each case in it runs in its own try: a failure is recorded with its traceback and the rest
still runs. A case starts only while the time left, less what the later sections need, covers the longest case
so far; the others are skipped with a note. Exit status 0 when every check that ran passed.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

import dist
from data import Batches
from lora import lora_parameters
from memtrack import GiB, MiB, peak_memory
from model import ModelArgs
from reference import (LLAMA2_7B, METHODS, RHO, WITH_REF, build_hf, build_ours, build_ref, cpu_name,
                       generation_times, make_batch, make_optimizer, ours_step, random_state, ref_step, spread,
                       timed, uniform_layers)
from trainer import RunDir, train
from tvaccine import AlignmentMethod

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames that peft still calls
BF16_EPS = 2.0 ** -8
TOL = {
    # fp32: both stacks compute the same sums in another order: ~1e-7 relative per operation, ~1e-6 after a step
    # (measured: <= 5e-7 on CPUs). 1e-4 leaves 100x; a difference in the maths (RoPE, scaling, masking, which
    # factors train) is 1e-2 to 1.
    "fp32": 1e-4,
    # bf16: each stack rounds every intermediate to 8 significant bits (unit roundoff 2^-9), at places the other
    # does not share; the results differ by a random walk of those roundings, measured at 0.6-1.0% = 1.5-2.5 x
    # 2^-8 on CPUs (widths 256-1024, 2-4 layers). The tolerance is 8 x 2^-8 = 3.1%.
    "bf16": 8 * BF16_EPS,
    # ours' distance to the fp32 result may be at most twice the reference's: as accurate as the reference, up
    # to the spread of random rounding (measured ratios 0.8-1.1 on CPUs).
    "bf16_vs_ref_accuracy": 2.0,
    # data parallel against one process: fp32 sums split over the ranks, AdamW's division amplifies where |g| is
    # small (tests/test_distributed.py measured <= 3e-5 relative); losses and norms are plain sums.
    "dp_update": 1e-4, "dp_metric": 1e-5,
    # the tracker against CUDA's max_memory_allocated (issue 24's target); on the CPU against the allocator at
    # tiny shapes, where the kernels' scratch buffers are a larger share (tests/test_bench.py: 5%).
    "memory_cuda": 0.03, "memory_cpu": 0.05,
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shapes and repetitions of one mode; `needs_s`: the time each section needs at least (its reserve)."""
    check: ModelArgs
    check_batch: tuple[int, int]
    big: ModelArgs  # memory and speed
    big_batch: tuple[int, int]
    rounds: int
    prompts: int
    new_tokens: int
    dp: ModelArgs
    needs_s: dict


TINY_ARGS = ModelArgs(vocab_size=256, dim=64, n_layers=4, n_heads=4, hidden_dim=96)
PLANS = {
    "full": Plan(dataclasses.replace(LLAMA2_7B, n_layers=4), (4, 64), LLAMA2_7B, (10, 200), 3, 16, 128,
                 ModelArgs(vocab_size=1024, dim=256, n_layers=4, n_heads=4, hidden_dim=688),
                 {"correctness": 30, "memory": 120, "speed": 90, "distributed": 45}),
    "tiny": Plan(TINY_ARGS, (3, 24), dataclasses.replace(TINY_ARGS, n_layers=2), (3, 24), 1, 4, 8, TINY_ARGS,
                 {"correctness": 5, "memory": 10, "speed": 5, "distributed": 20}),
}


def gamma_of(L: int) -> int:
    """T-Vaccine's gamma: the paper's 8 on a deep model, half the layers on a shallow one."""
    return 8 if L >= 16 else max(1, L // 2)

# ----------------------------------------------------------------------------------------------------------------
# Budget, sections, cases


class Section:
    """One section's results and clock: it may run until the budget's end less what the later sections need."""

    def __init__(self, name: str, deadline: float):
        self.name, self.deadline, self.t0 = name, deadline, time.monotonic()
        self.cases, self.skipped, self.notes, self.longest = [], [], [], 0.0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, fn, estimate_s: float | None = None):
        """fn() -> dict of results, recorded under `name`; skipped (with a note) when the time left is less than
        estimate_s (None: the longest case so far); an exception is recorded with its traceback."""
        need = self.longest if estimate_s is None else estimate_s
        if self.left() < need:
            self.skipped.append(f"{name}: skipped, {max(self.left(), 0):.0f} s left for this section, needs ~"
                                f"{need:.0f} s")
            return None
        t = time.monotonic()
        try:
            case = {"case": name, **fn()}
        except Exception:  # noqa: BLE001 -- recorded in the report, the other cases still run
            case = {"case": name, "passed": False, "error": traceback.format_exc()}
        finally:
            free()
        case["seconds"] = round(time.monotonic() - t, 1)
        self.longest = max(self.longest, case["seconds"])
        self.cases.append(case)
        return case

    def report(self) -> dict:
        checks = [c["passed"] for c in self.cases if c.get("passed") is not None]
        status = "error" if any("error" in c for c in self.cases) else "failed" if not all(checks) else "passed"
        return {"status": status if self.cases else "skipped", "seconds": round(time.monotonic() - self.t0, 1),
                "cases": self.cases, "skipped": self.skipped, "notes": self.notes}


def free():
    """Drop every model and cached weight of the last case, so the next one starts from an empty device."""
    random_state.cache_clear()
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """||x - y|| / ||y||, in fp32."""
    x, y = x.float(), y.float()
    return float((x - y).norm() / y.norm())


def on(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}

# ----------------------------------------------------------------------------------------------------------------
# 1. Correctness against transformers + peft


def four_ways(args: ModelArgs, device: str, run) -> dict:
    """run(stack, dtype, weights) for ours / the reference in bf16 / fp32 over the same random bf16 weights (fp32:
    their exact values), and how the four results agree."""
    torch.manual_seed(0)
    bf16 = random_state(repr(args), device, torch.bfloat16)
    weights = {torch.bfloat16: bf16, torch.float32: {k: v.float() for k, v in bf16.items()}}
    out = {(stack, dt): run(stack, dt, w) for dt, w in weights.items() for stack in ("ours", "ref")}
    exact = out["ref", torch.float32]
    r = {"fp32 ours vs ref": rel(out["ours", torch.float32], exact),
         "bf16 ours vs ref": rel(out["ours", torch.bfloat16], out["ref", torch.bfloat16]),
         "bf16 vs fp32, ours": rel(out["ours", torch.bfloat16], exact),
         "bf16 vs fp32, ref": rel(out["ref", torch.bfloat16], exact)}
    r["passed"] = (r["fp32 ours vs ref"] <= TOL["fp32"] and r["bf16 ours vs ref"] <= TOL["bf16"]
                   and r["bf16 vs fp32, ours"] <= TOL["bf16_vs_ref_accuracy"] * r["bf16 vs fp32, ref"])
    return r


def logits_case(args: ModelArgs, batch: dict, device: str) -> dict:
    """Logits of our Transformer and of LlamaForCausalLM at the real (unpadded) positions."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)

    def run(stack, dtype, weights):
        with torch.no_grad():
            if stack == "ours":
                logits = build_ours(args, device, dtype, False, weights, lora=False).eval()(ids, mask)
            else:
                logits = build_hf(args, device, dtype, weights).eval()(input_ids=ids, attention_mask=mask).logits
        return logits.float()[mask.bool()]
    return four_ways(args, device, run)


def lora_factors(model) -> dict:
    """LoRA factors under our names (peft's `base_model.model.model.` prefix and `.default` adapter name off)."""
    return {n.replace("base_model.model.model.", "").replace(".default", ""): p
            for n, p in model.named_parameters() if "lora_" in n}


def set_factors(factors: dict):
    """The same LoRA values on every build, from a seeded generator: A as PEFT's init bound, B nonzero, so that
    every factor gets a gradient."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in sorted(factors):
            p = factors[n]
            if "lora_A" in n:  # uniform within +-1/sqrt(in), PEFT's (kaiming) bound
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * p.shape[1] ** -0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def step_case(args: ModelArgs, method: str, batch: dict, harm: dict, S: list[int], device: str) -> dict:
    """The change of every LoRA factor in one step (ours with checkpointing, the GPU default; the reference with
    the same trainable factors), LoRA dropout 0. SGD with lr 1, so that the change is the clipped gradient
    itself: AdamW's first step is lr * sign(g), which would hide the gradient's errors."""
    b, h = on(batch, device), on(harm, device)
    outside = {}  # factors of layers outside S that changed, per stack

    def run(stack, dtype, weights):
        model = (build_ours(args, device, dtype, True, weights, dropout=0.0) if stack == "ours" else
                 build_ref(args, device, dtype, False, weights, dropout=0.0))
        factors = lora_factors(model)
        set_factors(factors)
        before = {n: p.detach().clone() for n, p in factors.items()}
        opt = torch.optim.SGD(list(factors.values()), lr=1.0)
        if stack == "ours":
            ours_step(model, opt, method, b, S, h)
        else:
            ref_step(model, opt, method, b, S, public_freezing=False)
        delta = {n: p.detach() - before[n] for n, p in sorted(factors.items())}
        outside[stack] = [n for n, d in delta.items() if int(n.split(".")[1]) not in S and bool(d.any())]
        return torch.cat([d.flatten() for d in delta.values()])
    r = four_ways(args, device, run)
    agree = r.pop("passed")
    r["factors outside S changed"] = sum(map(len, outside.values()))
    return {**r, "passed": agree and r["factors outside S changed"] == 0}


def correctness(sec: Section, plan: Plan, device: str):
    args, (B, T) = plan.check, plan.check_batch
    batch, harm = make_batch(B, T, args.vocab_size, 0), make_batch(B, T, args.vocab_size, 1)
    S = list(range(1, args.n_layers, 2))  # layer 0 left out: the layers below min(S) run without a graph
    sec.notes.append(f"{args.n_layers} layers, dim {args.dim}, vocab {args.vocab_size}; batch {B} x {T} "
                     f"right-padded; T-Vaccine S = {S}; tolerances: fp32 {TOL['fp32']:.0e}, bf16 "
                     f"{TOL['bf16']:.4f} (8 x 2^-8), bf16 vs fp32 at most {TOL['bf16_vs_ref_accuracy']}x the "
                     "reference's")
    sec.run("logits", lambda: logits_case(args, batch, device))
    for m in WITH_REF:
        sec.run(f"step {m}", lambda m=m: step_case(args, m, batch, harm, S if m == "tvaccine" else
                                                   list(range(args.n_layers)), device))

# ----------------------------------------------------------------------------------------------------------------
# 2. Memory: the tracker's prediction against the device


def memory_case(args, method, stack, batch, harm, device) -> dict:
    S = spread(args.n_layers, gamma_of(args.n_layers)) if method == "tvaccine" else list(range(args.n_layers))
    unit, size = ("GiB", GiB) if args == LLAMA2_7B else ("MiB", MiB)
    predicted = peak_memory(stack, args, method, "meta", S, batch, harm)["peak"]
    r = {f"predicted ({unit})": predicted / size}
    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        if predicted > 0.95 * total:  # the CUDA context and allocator need the rest
            return {**r, "passed": None, "note": f"does not fit the card's {total / GiB:.1f} GiB"}
        r[f"resident before ({unit})"] = torch.cuda.memory_allocated() / size  # ~0: nothing left over
        measured = peak_memory(stack, args, method, "cuda", S, batch, harm)["peak"]
        tol = TOL["memory_cuda"] if args == LLAMA2_7B else None  # tiny shapes: allocator rounding dominates
    else:
        measured = peak_memory(stack, args, method, "cpu", S, batch, harm, profile=True)["allocator"]
        tol = TOL["memory_cpu"]
    ratio = predicted / measured
    return {**r, f"measured ({unit})": measured / size, "predicted / measured": ratio,
            "passed": None if tol is None else abs(ratio - 1) <= tol}


def memory(sec: Section, plan: Plan, device: str):
    args, (B, T) = plan.big, plan.big_batch
    batch, harm = (make_batch(B, T, args.vocab_size, s, padded=False) for s in (0, 1))
    what = "torch.cuda.max_memory_allocated" if device == "cuda" else "the CPU allocator's peak (profiler)"
    S = spread(args.n_layers, gamma_of(args.n_layers))
    sec.notes.append(f"{args.n_layers} layers, dim {args.dim}; batch {B} x {T}; bf16 weights, LoRA r8 fp32 + "
                     f"AdamW state; two full steps (T-Vaccine: the importance pass first, S = {S}: layer 0 in S "
                     f"is the worst case); measured: {what}; predicted: the tracker on `meta`")
    for stack in ("ours", "ours-nockpt"):  # the GPU default first
        for m in METHODS:
            sec.run(f"{m}, {'checkpointing' if stack == 'ours' else 'no checkpointing'}",
                    lambda m=m, stack=stack: memory_case(args, m, stack, batch, harm, device))

# ----------------------------------------------------------------------------------------------------------------
# 3. Speed


def step_times(args, method, ours, refs, opts, batch, S, rounds) -> dict:
    """Median step time of each stack after a warmup round; the stacks interleaved in every round."""
    times = {s: [] for s in ("ours", "ours-nockpt", *refs)}
    for r in range(1 + rounds):  # round 0 warms up (allocations, kernel choices, lazy inits) and is dropped
        for stack in times:
            if stack.startswith("ours"):
                ours.checkpointing = stack == "ours"
                dt = timed(ours_step, ours, opts["ours"], method, batch, S)
            else:
                dt = timed(ref_step, refs[stack], opts[stack], method, batch, S)
            if r:
                times[stack].append(dt)
    ours.checkpointing = True
    med = {k: statistics.median(v) for k, v in times.items()}
    return {**{f"{k} (s)": v for k, v in med.items()}, "ours / ref": med["ours"] / med["ref"],
            "ours / ref-ckpt": med["ours"] / med["ref-ckpt"], "ours-nockpt / ref": med["ours-nockpt"] / med["ref"],
            "passed": None}


def generation_case(args, plan: Plan, device: str) -> dict:
    """generate.py against transformers' generate: random prompts of 16-64 token ids, greedy."""
    torch.manual_seed(0)
    state = random_state(repr(args), device, torch.bfloat16)
    model = build_ours(args, device, torch.bfloat16, False, state, lora=False).eval()
    hf = build_hf(args, device, torch.bfloat16, state).eval()
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(16, 65, (plan.prompts,), generator=g).tolist()
    prompts = [" ".join(map(str, torch.randint(3, args.vocab_size, (n,), generator=g).tolist())) for n in lengths]
    t = generation_times(model, hf, IdTokenizer(stop_ids={2}), prompts, plan.new_tokens, plan.rounds)
    n = plan.prompts * plan.new_tokens
    return {"ours (tokens/s)": n / t["ours_s"], "transformers (tokens/s)": n / t["hf_s"],
            "ours / transformers speed": t["hf_s"] / t["ours_s"], "prompt tokens": f"{t['shortest']}-{t['longest']}",
            "passed": None}


@dataclasses.dataclass
class IdTokenizer:
    """Prompts written as token ids ("5 17 9"): generate.py's tokenizer interface without a tokenizer file."""
    stop_ids: set
    pad_id: int = 0
    eos_id: int = 2

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def speed(sec: Section, plan: Plan, device: str):
    args, (B, T) = plan.big, plan.big_batch
    L, gamma = args.n_layers, gamma_of(args.n_layers)
    S = uniform_layers(L, gamma)
    sec.notes.append(f"bf16, batch {B} x {T} right-padded, LoRA dropout 0.1; median of {plan.rounds} interleaved "
                     f"rounds after a warmup round; T-Vaccine S = {S} (a uniform draw of {gamma}; the reference "
                     "trains every MLP factor, as the public code); generation: "
                     f"{plan.prompts} prompts, {plan.new_tokens} new tokens, median of {plan.rounds}")
    batch = on(make_batch(B, T, args.vocab_size, 0), device)
    holder = {}

    def build():
        torch.manual_seed(0)
        state = random_state(repr(args), device, torch.bfloat16)
        holder["ours"] = build_ours(args, device, torch.bfloat16, True, state)
        holder["refs"] = {s: build_ref(args, device, torch.bfloat16, s == "ref-ckpt", state)
                          for s in ("ref", "ref-ckpt")}
        holder["opts"] = {"ours": make_optimizer(lora_parameters(holder["ours"])),
                          **{s: make_optimizer(list(lora_factors(r).values())) for s, r in holder["refs"].items()}}
        return {"passed": None}
    sec.run("build ours + reference", build)
    if "ours" in holder:
        for m in WITH_REF:
            sec.run(f"step {m}", lambda m=m: step_times(args, m, holder["ours"], holder["refs"], holder["opts"],
                                                         batch, S if m == "tvaccine" else list(range(L)),
                                                         plan.rounds))
    holder.clear()
    free()
    sec.run("generation", lambda: generation_case(args, plan, device))

# ----------------------------------------------------------------------------------------------------------------
# 4. torchrun: data parallel and FSDP against one process


def dp_steps(args: ModelArgs, device: str, fsdp: bool, workdir: Path) -> dict:
    """Two T-Vaccine steps (importance every step, gamma = half the layers) through trainer.train, the product's
    loop with dist.py's data parallelism; fp32, LoRA dropout 0. Rank 0's change of every LoRA factor and its
    logged metrics (losses and grad norms of the global batch, the layers drawn)."""
    dev = dist.device(device)
    random_state.cache_clear()  # drawn afresh after the seed, in every process
    torch.manual_seed(0)
    model = build_ours(args, "cpu", torch.float32, True, dropout=0.0)  # built on the CPU: the same values anywhere
    params = lora_parameters(model)
    dist.broadcast_from_main(params)  # as trainer.prepare_model
    if fsdp:
        dist.shard_model(model, params, dev)
    else:
        model.to(dev)
    before = {n: p.detach().cpu().clone() for n, p in lora_factors(model).items()}
    rows = lambda b: [(ids[m.bool()].tolist(), lab[m.bool()].tolist())  # noqa: E731
                      for ids, m, lab in zip(b["input_ids"], b["attention_mask"], b["labels"])]
    batches, harmful = (Batches(rows(make_batch(8, 24, args.vocab_size, s)), 4, 0, seed=s, shuffle=False)
                        for s in (0, 1))
    method = AlignmentMethod(model, "tvaccine", RHO, gamma_of(args.n_layers), 1, 1, harmful, seed=0)
    run = RunDir(workdir, {"check": "distributed", "fsdp": fsdp}, overwrite=True)
    train(model, params, batches, method, run, lr=1e-3, epochs=1, weight_decay=0.0, warmup_ratio=0.0,
          max_grad_norm=1.0, save_every=0, resume=False, method_state=method, progress=False, desc="gpu_check")
    metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()] if run.writes else []
    return {"delta": {n: p.detach().cpu() - before[n] for n, p in lora_factors(model).items()}, "metrics": metrics}


def dp_worker(plan_name: str, device: str, out: str):
    """Under torchrun: one all-reduce of ones (a collective even on one process, where dist.py's helpers do
    nothing), the data-parallel run, then the FSDP run; rank 0 saves all to `out`."""
    import torch.distributed as tdist
    dist.init()
    ones = torch.ones(1, device=dist.device(device))
    tdist.all_reduce(ones)
    work = Path(out).parent
    runs = {kind: dp_steps(PLANS[plan_name].dp, device, kind == "fsdp", work / f"run-{kind}") for kind in
            ("data parallel", "fsdp")}
    if dist.is_main():
        torch.save({"backend": tdist.get_backend(), "world size": dist.world_size(),
                    "all-reduce of ones": float(ones), "runs": runs}, out)
    dist.finish()


def dp_agreement(one: dict, many: dict) -> dict:
    names = sorted(one["delta"])
    if sorted(many["delta"]) != names:
        raise RuntimeError("the runs trained different LoRA factors")
    flat = lambda r: torch.cat([r["delta"][n].flatten() for n in names])  # noqa: E731
    worst = max((abs(b[k] / a[k] - 1) for a, b in zip(one["metrics"], many["metrics"], strict=True)
                 for k in ("loss", "loss_pass1", "grad_norm")), default=float("inf"))
    same_layers = [a["layers"] for a in one["metrics"]] == [b["layers"] for b in many["metrics"]]
    r = {"update vs one process": rel(flat(many), flat(one)), "losses, grad norm vs one process": worst,
         "same layers": same_layers, "steps": len(many["metrics"])}
    r["passed"] = (r["update vs one process"] <= TOL["dp_update"] and worst <= TOL["dp_metric"] and same_layers
                   and r["steps"] == 2)
    return r


def torchrun(plan_name: str, device: str, n: int, work: Path, timeout_s: float) -> dict:
    out = work / f"ranks{n}" / "runs.pt"
    out.parent.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # dist.init picks gloo when no GPU is visible
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(dist.free_port()), str(Path(__file__).resolve()), "--dp-worker", plan_name, device,
           str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(timeout_s, 1))
    if p.returncode != 0:
        tail = (p.stdout + p.stderr)[-4000:]
        raise RuntimeError(f"torchrun --nproc_per_node {n} exited with {p.returncode}:\n{tail}")
    return torch.load(out, weights_only=True)


def distributed(sec: Section, plan_name: str, device: str):
    plan = PLANS[plan_name]
    counts = [1, 2] if device == "cuda" and torch.cuda.device_count() >= 2 else [1] if device == "cuda" else [2]
    backend = "nccl" if device == "cuda" else "gloo"
    sec.notes.append(f"{backend}; {plan.dp.n_layers} layers, dim {plan.dp.dim}, fp32; 8 examples, global batch 4 "
                     f"(split over the ranks), 2 T-Vaccine steps through trainer.train; torchrun with "
                     f"{' and '.join(map(str, counts))} process(es) against one plain process")
    with tempfile.TemporaryDirectory() as tmp:
        work, results = Path(tmp), {}

        def one():
            results["one"] = dp_steps(plan.dp, device, False, work / "one")
            return {"passed": None}

        def launch(n):
            results[n] = torchrun(plan_name, device, n, work, sec.left())
            info = {k: v for k, v in results[n].items() if k != "runs"}
            return {**info, "passed": info["all-reduce of ones"] == n and info["world size"] == n}
        sec.run("one process", one)
        for n in counts if "one" in results else []:
            sec.run(f"torchrun x{n}: launch", lambda n=n: launch(n))
            for kind, result in results.get(n, {}).get("runs", {}).items():
                sec.run(f"torchrun x{n}: {kind}", lambda result=result: dp_agreement(results["one"], result), 0)

# ----------------------------------------------------------------------------------------------------------------
# Report


def device_info(device: str) -> dict:
    import peft
    import transformers
    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "cpu": cpu_name(), "cpu threads": torch.get_num_threads()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update({"gpu": p.name, "gpus": torch.cuda.device_count(),
                     "gpu memory (GiB)": round(p.total_memory / GiB, 1),
                     "compute capability": f"{p.major}.{p.minor}", "cudnn": torch.backends.cudnn.version(),
                     "nccl": ".".join(map(str, nccl)) if isinstance(nccl := torch.cuda.nccl.version(), tuple)
                     else str(nccl),
                     "fp32 matmul precision": torch.get_float32_matmul_precision()})
    return info


def cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v).replace("|", "/")


def markdown(report: dict) -> str:
    lines = [f"# gpu_check ({report['mode']})\n", "| | |\n|---|---|"]
    lines += [f"| {k} | {cell(v)} |" for k, v in report["device"].items()]
    lines += [f"\nbudget {report['budget_s']} s, used {report['elapsed_s']} s; every check that ran passed: "
              f"{report['passed']}; nothing skipped: {report['complete']}\n"]
    for name, s in report["sections"].items():
        lines.append(f"## {name}: {s['status']} ({s['seconds']} s)\n")
        lines += [f"{n}\n" for n in s["notes"]]
        cols = None
        for row in ({k: v for k, v in c.items() if k != "error"} for c in s["cases"]):
            if list(row) != cols:  # a new table where the columns change (e.g. generation after step times)
                cols = list(row)
                lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines.append("| " + " | ".join(cell(row[k]) for k in cols) + " |")
        lines += [""] + [f"- {x}" for x in s["skipped"]]
        lines += [f"\n**{c['case']}** raised:\n```\n{c['error']}```" for c in s["cases"] if "error" in c]
        lines.append("")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))  # one blank line between blocks


def write(out: Path, report: dict):
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (default device: cpu): the CI run")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--budget-s", type=float, default=420, help="total seconds; later cases are skipped to fit")
    p.add_argument("--dp-worker", nargs=3, metavar=("PLAN", "DEVICE", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.dp_worker:
        dp_worker(*a.dp_worker)
        return 0
    if a.out is None:
        p.error("OUT folder missing")
    device = a.device or ("cpu" if a.tiny else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible; --tiny runs the same checks on the CPU")
    if device == "cpu" and not a.tiny:
        raise SystemExit("the full shapes (7B) need a GPU; --tiny runs the same checks on the CPU")
    plan_name = "tiny" if a.tiny else "full"
    if plan_name == "tiny" and device == "cpu":
        torch.set_num_threads(1)  # tiny ops: no thread barriers to wait on when other jobs share the cores
    return run_all(Path(a.out), plan_name, device, a.budget_s)


def run_all(out: Path, plan_name: str, device: str, budget_s: float) -> int:
    plan, t0 = PLANS[plan_name], time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    mode = f"{'CPU' if device == 'cpu' else 'CUDA'}, {'tiny shapes' if plan_name == 'tiny' else '7B shapes'}"
    report = {"mode": mode, "device": device_info(device), "budget_s": budget_s, "tolerances": TOL,
              "sections": {}, "passed": None, "complete": None, "elapsed_s": 0}
    sections = [("correctness", lambda s: correctness(s, plan, device)),
                ("memory", lambda s: memory(s, plan, device)),
                ("speed", lambda s: speed(s, plan, device)),
                ("distributed", lambda s: distributed(s, plan_name, device))]
    for i, (name, fn) in enumerate(sections):
        later = sum(plan.needs_s[n] for n, _ in sections[i + 1:])
        sec = Section(name, t0 + budget_s - later)
        try:
            fn(sec)
        except Exception:  # noqa: BLE001 -- recorded; the next section still runs
            sec.cases.append({"case": "(section)", "passed": False, "error": traceback.format_exc()})
        report["sections"][name] = sec.report()
        report["elapsed_s"] = round(time.monotonic() - t0, 1)
        report["passed"] = all(s["status"] in ("passed", "skipped") for s in report["sections"].values())
        report["complete"] = all(s["status"] != "skipped" and not s["skipped"] for s in report["sections"].values())
        write(out, report)
    print(markdown(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
