"""How much T-Vaccine's layer importance P depends on the harmful batch it is computed on (issue 23's diagnostic).

The paper scores importance on a batch of harmful data; the authors' code on a single harmful example
(`--harmful-batch-size 1`). This draws `--draws` batches of each size from D_h (the same harmful set and the same
`layer_importance` as tvaccine.py), on the base model or an aligned one (`--adapter`, merged first), and compares
each draw's P with the reference P of all N_h examples in one batch:

- TV: total-variation distance to the reference, 0.5 * sum_l |P_l - P_ref_l| (0: the same P; 1: disjoint);
- P_0: layer 0's share (0.56 on SmolLM2's instruct model with 10 examples, docs/RESULTS.md);
- top-gamma overlap: how many of the reference's gamma heaviest layers are among the draw's gamma heaviest.

    python importance.py --data-dir ../shared/data --batch-sizes 1,10 --draws 20 --out runs/importance-base.json
    python importance.py --data-dir ../shared/data --adapter runs/pc/seed1/align-sft/adapter --out ...

Prints a markdown table; --out also keeps every P (JSON).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from trainer import DTYPES, check_adapter_folder, cli


def harmful_examples(args, tokenizer) -> list:
    """D_h exactly as tvaccine.py builds it (its first --n-harmful unsafe rows of the safety train split)."""
    import data
    rows = data.load_safety("train", args.data_dir)
    return data.tokenize_dataset(tokenizer, data.harmful_set(rows, args.n_harmful), args.max_len, "D_h")


def importance_of(model, examples: list, pad_id: int, chunk: int = 10) -> torch.Tensor:
    """P of `examples` as one batch, as tvaccine.layer_importance computes it, but in chunks of `chunk` rows (all
    of D_h, 100 x 128, in one batch would need ~10 GB on the CPU; a drawn batch of up to `chunk` rows is one chunk):
    the batch loss is the mean over its N target tokens, and each row's hidden states feed only its own loss, so
    dL/dh_l is the chunks' dL_c/dh_l, each scaled by n_c / N, side by side: ||dL/dh_l||^2 = sum_c (n_c/N)^2
    ||dL_c/dh_l||^2."""
    import data
    from tvaccine import importance_norms
    squared, counts = [], []
    for i in range(0, len(examples), chunk):
        batch = data.collate(examples[i:i + chunk], pad_id)
        batch = {k: v.to(model.embed_tokens.weight.device) for k, v in batch.items()}
        squared.append(importance_norms(model, batch).pow(2))
        counts.append(int((batch["labels"][:, 1:] != -100).sum()))
    n = sum(counts)
    s = sum((c / n) ** 2 * sq for c, sq in zip(counts, squared)).sqrt()
    return (s / s.sum()).cpu()


def top(P: torch.Tensor, k: int) -> set[int]:
    return set(P.topk(k).indices.tolist())


def compare(P: torch.Tensor, ref: torch.Tensor, gamma: int) -> dict:
    return {"tv": 0.5 * (P - ref).abs().sum().item(), "p0": P[0].item(),
            "top_overlap": len(top(P, gamma) & top(ref, gamma))}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def table(ref: torch.Tensor, draws: dict[int, list[torch.Tensor]], gamma: int, n_ref: int) -> str:
    lines = [f"| harmful batch | draws | TV to the reference P | P_0 | top-{gamma} overlap (of {gamma}) |",
             "|---|---|---|---|---|",
             f"| all {n_ref} (reference) | 1 | 0 | {ref[0]:.3f} | {gamma} |"]
    for b, Ps in draws.items():
        c = [compare(P, ref, gamma) for P in Ps]
        lines.append(f"| {b} | {len(Ps)} | {mean_sd([x['tv'] for x in c])} | {mean_sd([x['p0'] for x in c])} | "
                     f"{mean_sd([float(x['top_overlap']) for x in c])} |")
    heavy = ", ".join(f"{l} ({ref[l]:.3f})" for l in ref.topk(gamma).indices.tolist())
    return "\n".join(lines) + f"\n\nReference P's {gamma} heaviest layers: {heavy}."


def parse_args(argv=None) -> argparse.Namespace:
    from model import DEFAULT_MODEL
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local HF folder, .gguf file or Hub repo id")
    p.add_argument("--adapter", default=None, help="an aligned adapter folder, merged into the base first")
    p.add_argument("--data-dir", default=None, help="local data folder (e.g. ../shared/data); default: the Hub")
    p.add_argument("--n-harmful", type=int, default=100, help="N_h: the harmful set (the CPU recipes' 100); the "
                   "reference P is computed on all of it in one batch")
    p.add_argument("--batch-sizes", default="1,10", help="harmful batch sizes to draw, comma-separated")
    p.add_argument("--draws", type=int, default=20, help="batches drawn per size (disjoint while D_h lasts)")
    p.add_argument("--gamma", type=int, default=16, help="the top-gamma overlap's gamma")
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0, help="which batches are drawn")
    p.add_argument("--out", default=None, help="JSON file keeping every P")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    return args


def check_args(args):
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.draws < 1 or args.gamma < 1:
        raise ValueError("need --batch-sizes >= 1, --draws >= 1 and --gamma >= 1")
    if max(args.batch_sizes) > args.n_harmful:
        raise ValueError(f"--batch-sizes {max(args.batch_sizes)} exceeds --n-harmful {args.n_harmful}")
    check_adapter_folder("--adapter", args.adapter)


def main(argv=None) -> str:
    import data
    from trainer import prepare_model
    args = parse_args(argv)
    check_args(args)
    # The model as T-Vaccine scores it: the (aligned) base with a fresh LoRA (B = 0), in train mode.
    prep = argparse.Namespace(model=args.model, dtype=args.dtype, device=args.device, checkpointing=False,
                              lora_rank=8, lora_alpha=4.0, lora_dropout=0.0, seed=args.seed)
    model, tokenizer = prepare_model(prep, adapter_to_merge=args.adapter)
    if args.gamma > model.args.n_layers:
        raise ValueError(f"--gamma {args.gamma} exceeds the model's {model.args.n_layers} layers")
    examples, pad = harmful_examples(args, tokenizer), data.pad_id_of(tokenizer)
    ref = importance_of(model, examples, pad)  # the reference: all of D_h
    gen, draws = torch.Generator().manual_seed(args.seed), {}
    for b in args.batch_sizes:
        order, Ps = [], []
        for _ in range(args.draws):
            if len(order) < b:  # a fresh permutation once D_h is used up
                order = torch.randperm(len(examples), generator=gen).tolist()
            rows, order = order[:b], order[b:]
            Ps.append(importance_of(model, [examples[i] for i in rows], pad))
        draws[b] = Ps
    text = table(ref, draws, args.gamma, len(examples))
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "reference": ref.tolist(),
                                              "draws": {str(b): [P.tolist() for P in Ps] for b, Ps in draws.items()}}))
    return text


if __name__ == "__main__":
    cli(main)
