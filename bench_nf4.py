"""Memory of the NF4 base (`--quantize nf4`, quant.py): bench.py section 1's rows at 7B, and the loading peak.

    python bench.py --sections 1 --methods sft,vaccine,tvaccine --gammas '' --quantize nf4   # 7B rows (via bench)
    python bench_nf4.py loading        # peak host memory while loading a sharded checkpoint, dense vs NF4

- `nf4_memory` (called by bench.section1 with --quantize nf4): the same tracker as section 1 (`bench.LiveBytes` on
  the `meta` device) over our stack with an NF4 base, first checked against real CPU runs of the same code (NF4
  weights quantised from random bf16 ones) and against the CPU allocator, and the tracked weight bytes against
  the NF4 layout's formula (uint8 codes + int8 scalers + fp32 factors and mean); then SFT, Vaccine and T-Vaccine
  at 7B next to the bf16 base's rows, and a fit over depth as section 1 does.
- `loading`: writes a random Llama checkpoint (~340 MB bf16, 12 layers, several safetensors shards) and loads it
  in a fresh process per mode through model.build_from_tensors; reports the growth of peak RSS (VmHWM) over the
  RSS before loading. RSS also counts the pages of the shard being read (safetensors memory-maps its file).
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

import bench
import quant
from bench import GiB, LLAMA2_7B, MiB, gib, make_batch, peak_memory, spread
from model import ModelArgs

METHODS = ("sft", "vaccine", "tvaccine")


def layer_weight_bytes(args: ModelArgs, dtype=torch.bfloat16) -> tuple[int, int]:
    """(bytes of every layer linear in NF4 by the layout's formula, bytes of everything else in `dtype`)."""
    size = torch.tensor([], dtype=dtype).element_size()
    nf4 = sum(quant.nf4_nbytes(i * o) for i, o in bench.lora_shapes(args))
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
    bench.random_state.cache_clear()
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


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def load_once(folder: str, quantize: str | None) -> dict:
    """In this (fresh) process: RSS before, peak RSS after, time and bytes of the loaded model."""
    import weights
    from model import ModelArgs as Args, build_from_tensors
    source = Path(folder)
    args = Args.from_hf(weights.read_config(source))
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    model = build_from_tensors(args, weights.iter_tensors(weights.weight_files(source)), torch.bfloat16, "cpu",
                               quantize=quantize)
    seconds = time.perf_counter() - t0
    held = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    return {"rss_before": before * 1024, "peak_rss": _status_kib("VmHWM") * 1024, "seconds": seconds, "model": held}


def loading(threads: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        total = write_checkpoint(Path(tmp))
        files = sorted(Path(tmp).glob("*.safetensors"))
        print(f"## Loading peak: a random Llama (dim {LOADING_MODEL.dim}, {LOADING_MODEL.n_layers} layers, vocab "
              f"{LOADING_MODEL.vocab_size}), {total / MiB:.0f} MiB of bf16 in {len(files)} safetensors shards of "
              f"<= {SHARD_BYTES // MiB} MiB\n")
        print("Each mode in a fresh process (`model.build_from_tensors`, bf16 on the CPU); peak RSS (VmHWM) minus the "
              "RSS just before loading.\n")
        print("| base | model held after loading (MiB) | peak RSS growth while loading (MiB) | load time (s) |\n"
              "|---|---|---|---|")
        for quantize in (None, "nf4"):
            env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
            out = subprocess.run([sys.executable, __file__, "_load", tmp, quantize or "none"], capture_output=True,
                                 text=True, check=True, env=env).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {quantize or 'bf16'} | {r['model'] / MiB:.0f} | {(r['peak_rss'] - r['rss_before']) / MiB:.0f} | "
                  f"{r['seconds']:.1f} |")
        print()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["loading", "_load"], help="loading: the loading-peak table")
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.what == "_load":  # the child process of `loading`
        folder, quantize = a.rest
        print(json.dumps(load_once(folder, None if quantize == "none" else quantize)))
    else:
        loading(a.threads)


if __name__ == "__main__":
    main()
