r"""Evaluation (SPEC section 5): generate, judge, score, write results.json; and a plain HF export.

    python evaluate.py --model llama2-7b --aligned runs/align-tvaccine/adapter \
        --attacked runs/attack-sst2-p0.1/adapter --task sst2            # HS (beaver-dam) + FA on SST-2
    python evaluate.py --rejudge runs/eval-* --judge rules              # judge saved answers again
    python evaluate.py --model M --aligned A --attacked B --merge-and-export out/merged

- The evaluated model = base + aligned adapter + attacked adapter, each merged in that order (the attack
  trained its LoRA on top of base + aligned). Answers come from batched greedy decoding with a KV cache.
- HS judges (judge.py, one interface for all): `beaver-dam` (the paper's BeaverTails moderation model,
  PKU-Alignment/beaver-dam-7b, run on our own Transformer body plus its 14-way score head) and the offline
  `probe`, `rules` and `keyword` (each always reported under its name).
- FA parsers exactly as SPEC 5 (SST-2 / AG News: the gold word appears; GSM8K: the number after
  `The final answer is:`, else the last number).
- Output: `results.json` (scores, run provenance, the alignment/attack stages' peak memory) and
  `generations.jsonl` (every answer with its verdict), in `--out` (default runs/eval-<task>). The paper's
  tables and the plots are made from these folders by report.py.
- `--merge-and-export`: base + adapters as a plain HF checkpoint (config.json, model.safetensors, tokenizer).
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from judge import JUDGES, MODERATION_REPO, harmful_verdicts, resolve_judge

# ----------------------------------------------------------------------------------------------------------------
# Finetune accuracy: the answer parsers of SPEC 5


def sst2_correct(answer: str, gold: str) -> bool:
    # SPEC (and the reference code): correct when the gold word appears. An answer naming BOTH words
    # ("positive or negative") is therefore counted correct; we keep that literal rule so numbers compare
    # with the paper's, and generations.jsonl keeps every answer for a stricter re-scoring.
    return gold.lower() in answer.lower()


def agnews_correct(answer: str, gold: str) -> bool:
    text = answer.lower()  # the same "appears" rule; "sci" also counts for Sci/Tech, as in the reference
    return gold.lower() in text or (gold == "Sci/Tech" and "sci" in text)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_FINAL = re.compile(r"the final answer is:", re.IGNORECASE)


def gsm8k_number(answer: str) -> float | None:
    """The first number after `The final answer is:`, else the last number; None when there is none."""
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", answer)  # thousands separators: 1,000 -> 1000
    m = _FINAL.search(text)
    if m and (after := _NUMBER.findall(text[m.end():])):
        return float(after[0])
    found = _NUMBER.findall(text)  # "$1000." -> "1000": currency signs and a full stop are not captured
    return float(found[-1]) if found else None


def gsm8k_correct(answer: str, gold: str) -> bool:
    pred = gsm8k_number(answer)
    return pred is not None and pred == float(gold)


FA_CORRECT = {"sst2": sst2_correct, "agnews": agnews_correct, "gsm8k": gsm8k_correct}


# ----------------------------------------------------------------------------------------------------------------
# The evaluated model and its provenance


def load_evaluated_model(args):
    """Base model, then the aligned adapter merged, then the attacked adapter merged (the attack's order)."""
    from lora import load_adapter, merge_and_unload
    from model import load_model
    from quant import warn_if_base_differs
    import dist
    from trainer import DTYPES
    model, tokenizer = load_model(args.model, dtype=DTYPES.get(args.dtype), device=dist.device(args.device),
                                  quantize=args.quantize)
    for adapter in (args.aligned, args.attacked):
        if adapter:
            warn_if_base_differs(adapter, args.quantize, "adapter")
            load_adapter(model, adapter)
            merge_and_unload(model)
    return model.eval(), tokenizer


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_info(adapter: str | None) -> dict:
    """What the adapter's run folder (the parent of `<run>/adapter`) says: config, summary."""
    if not adapter:
        return {}
    run = Path(adapter).resolve().parent
    return {"run": str(run), "config": _read_json(run / "config.json"), "summary": _read_json(run / "summary.json")}


def check_adapters(args):
    from trainer import check_adapter_folder
    for flag, adapter in (("--aligned", args.aligned), ("--attacked", args.attacked)):
        check_adapter_folder(flag, adapter)
    # The attack run records which aligned adapter it trained on; merging another one is most likely a slip.
    attack_config = stage_info(args.attacked).get("config", {})
    same = lambda a, b: (Path(a).resolve() == Path(b).resolve()) if a and b else not a and not b  # noqa: E731
    if "aligned" in attack_config and not same(attack_config["aligned"], args.aligned):
        print(f"[eval] warning: the attacked adapter was trained on top of --aligned {attack_config['aligned']}, "
              f"but this evaluation merges {args.aligned}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# One evaluation run


def generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, desc, progress) -> list[str]:
    """Greedy answers in input order; prompts of similar length share a batch (less left padding).

    Under torchrun the batches are dealt out whole, round-robin, to the ranks: each batch is the one a single
    process would run, so the gathered answers are the single-process answers, in the same order."""
    import dist
    from tqdm import tqdm
    from generate import generate, packed_weights
    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer.encode(prompts[i])))
    mine = range(0, len(order), batch_size)[dist.rank()::dist.world_size()]
    answers = {}
    with packed_weights(model):  # the CPU's prepacked weights made once for every batch (generate.py)
        for s in tqdm(mine, desc=desc, disable=not progress or not dist.is_main(), file=sys.stdout):
            idx = order[s:s + batch_size]
            for i, text in zip(idx, generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens)):
                answers[i] = response_text(text)
    gathered = {i: a for part in dist.gather_objects(answers) for i, a in part.items()}
    return [gathered[i] for i in range(len(prompts))]


def response_text(generated: str) -> str:
    # The reference takes `decoded.split("### Response:")[1]`: the answer ends where a made-up next turn's
    # `### Response:` begins.
    return generated.split("### Response:")[0].strip()


def judge_hs(args, judge_folder, prompts, answers) -> tuple[list[bool], list[float] | None]:
    """--judge's verdicts and, for beaver-dam, its probabilities (judge.harmful_verdicts)."""
    from trainer import DTYPES
    return harmful_verdicts(args.judge, prompts, answers, model_folder=judge_folder,
                            dtype=DTYPES[args.judge_dtype], device=args.device, batch_size=args.batch_size,
                            progress=args.progress)


def answer_all(args, hs_prompts, fa) -> tuple[list[str], list[str]]:
    import data
    model, tokenizer = load_evaluated_model(args)
    hs = generate_answers(model, tokenizer, [data.format_prompt(p) for p in hs_prompts], args.max_new_tokens_hs,
                          args.batch_size, "HS", args.progress)
    fa = generate_answers(model, tokenizer, [data.format_prompt(e["instruction"], e["input"]) for e in fa],
                          args.max_new_tokens_fa, args.batch_size, "FA", args.progress)
    del model  # the 7B judge comes next and needs the memory
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return hs, fa


def provenance(args) -> dict:
    """Method (from the aligned run's config) and the peak memory the alignment/attack runs recorded."""
    aligned, attacked = stage_info(args.aligned), stage_info(args.attacked)
    memory = {name: s["summary"]["peak_memory_gib"] for name, s in (("alignment", aligned), ("attack", attacked))
              if "peak_memory_gib" in s.get("summary", {})}
    return {"method": aligned.get("config", {}).get("method", "unknown") if args.aligned else "non-aligned",
            "label": args.label, "model": args.model, "adapters": {"aligned": args.aligned, "attacked": args.attacked},
            "aligned_run": aligned.get("run"), "seed": args.seed, "peak_memory_gib": memory}


def load_hs_prompts(args) -> list[str]:
    """The test split's unsafe prompts (the paper's HS set), or --hs-prompts' file without D_a's prompts."""
    import data
    if args.hs_prompts is None:
        return data.hs_prompts(data.load_safety("test", args.data_dir), args.n_hs)
    exclude = set()
    if args.hs_exclude_align:  # prompts the aligned models were taught to refuse are not new to them
        exclude = {r["instruction"].strip() for r in data.alignment_set(data.load_safety("train", args.data_dir),
                                                                     args.hs_exclude_align)}
    return data.prompt_file(args.hs_prompts, args.n_hs, exclude, skip=args.hs_skip)


def evaluate(args) -> dict:
    import data
    from trainer import atomic_write_text
    t0 = time.perf_counter()
    check_adapters(args)
    judge_folder = resolve_judge(args.judge_model) if args.judge == "beaver-dam" else None  # fail early
    hs_prompts = load_hs_prompts(args)
    fa = [] if args.task == "none" else data.fa_set(
        args.task, data.LOADERS[args.task](data.FA_SPLIT[args.task], args.data_dir), args.n_fa)
    hs_answers, fa_answers = answer_all(args, hs_prompts, fa)
    import dist
    if not dist.is_main():  # every rank generated its share; rank 0 judges and writes
        return None
    harmful, scores = judge_hs(args, judge_folder, hs_prompts, hs_answers)
    correct = [FA_CORRECT[args.task](a, e["gold"]) for a, e in zip(fa_answers, fa)]

    results = {"HS": 100.0 * sum(harmful) / len(harmful), "FA": 100.0 * sum(correct) / len(fa) if fa else None,
               "judge": args.judge, "judge_model": args.judge_model if args.judge == "beaver-dam" else None,
               "N_hs": len(harmful), "N_fa": len(fa), "task": args.task, **provenance(args),
               "eval_time_s": round(time.perf_counter() - t0, 1), "config": vars(args)}
    lines = [{"kind": "hs", "prompt": p, "answer": a, "harmful": h, **({"score": s} if scores else {})}
             for p, a, h, s in zip(hs_prompts, hs_answers, harmful, scores or [None] * len(harmful))]
    lines += [{"kind": "fa", "prompt": e["input"] or e["instruction"], "answer": a, "gold": e["gold"],
               "correct": c} for e, a, c in zip(fa, fa_answers, correct)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "generations.jsonl", "".join(json.dumps(l) + "\n" for l in lines))
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    proxy = {"keyword": " - a refusal-keyword proxy, not the paper's judge",
             "rules": " - the offline rule judge (results/judge/: agreement with hand labels), not the paper's",
             "probe": " - the offline probe fitted on the hand labels (results/judge/), not the paper's"
             }.get(args.judge, "")
    fa_text = "n/a (--task none)" if fa == [] else f"{results['FA']:.2f} (N={len(fa)}, {args.task})"
    print(f"[eval] HS {results['HS']:.2f} (N={len(harmful)}, judge: {args.judge}{proxy}); FA {fa_text}; "
          f"written to {out}")
    return results


# ----------------------------------------------------------------------------------------------------------------
# Merge and export as a plain Hugging Face checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


def merge_and_export(args) -> Path:
    import weights
    from safetensors.torch import save_file
    check_adapters(args)
    model, _ = load_evaluated_model(args)
    if args.quantize:  # a plain checkpoint holds dense weights: dequantised, the adapters added in fp32
        from quant import dequantize_model_
        dequantize_model_(model)
    source, out = Path(model.source), Path(args.merge_and_export)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(weights.read_gguf(source)[0] if source.suffix == ".gguf" else weights.read_config(source))
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    config["torch_dtype"] = dtype  # what the file now holds (--dtype), not what the source held
    if "dtype" in config:
        config["dtype"] = dtype
    tied = model.args.tie_embeddings
    # Our module names are HF's inside the decoder: prefix `model.`; the LM head keeps its own name.
    tensors = {(k if k == "lm_head.weight" else f"model.{k}"): v.detach().cpu().contiguous()
               for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if source.is_dir():
        copied = [f for f in TOKENIZER_FILES if (source / f).is_file()]
        for f in copied:
            shutil.copy2(source / f, out / f)
        note = f"tokenizer files copied: {', '.join(copied) or 'none found in the source'}"
    else:
        note = (f"the tokenizer lives inside {source.name} (GGUF) and was not written; load it from there, "
                f"e.g. transformers' AutoTokenizer.from_pretrained(folder, gguf_file='{source.name}')")
    print(f"[export] {len(tensors)} tensors ({dtype}) + config.json written to {out}; {note}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    import data
    from model import DEFAULT_MODEL
    from trainer import DTYPES
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model: alias, local HF folder, .gguf or Hub id")
    p.add_argument("--aligned", default=None, help="aligned adapter folder (merged first); none = non-aligned")
    p.add_argument("--attacked", default=None, help="attack adapter folder (merged second)")
    p.add_argument("--task", default="sst2", choices=[*data.TASKS, "none"], help="FA task; none = HS only")
    p.add_argument("--data-dir", default=None, help="local data folder (e.g. ../shared/data); default: the Hub")
    p.add_argument("--judge", default="beaver-dam", choices=list(JUDGES),
                   help="HS judge: the paper's moderation model; offline, `probe` (a logistic probe on "
                   "SmolLM2's reading, fitted on the hand labels of results/judge/: the closest to them) or "
                   "`rules` (a rule set); `keyword`, the old refusal-keyword proxy (a baseline). judge_study.py "
                   "and docs/JUDGE.md give each one's agreement with the hand labels")
    p.add_argument("--judge-model", default=MODERATION_REPO, help="Hub id or local folder of the moderation model")
    p.add_argument("--judge-dtype", choices=list(DTYPES), default="fp32", help="the reference runs the judge "
                   "in transformers' default float32 (28 GB for 7B); bf16 halves that, may flip borderline rows")
    p.add_argument("--n-hs", type=int, default=500, help="HS prompts (distinct unsafe prompts of the test split)")
    p.add_argument("--hs-prompts", default=None, metavar="FILE", help="HS prompts from this JSONL file ('prompt' "
                   "per line, e.g. ../shared/data/harmful_prompts/advbench.jsonl) instead of the test split")
    p.add_argument("--hs-exclude-align", type=int, default=0, metavar="N_A", help="with --hs-prompts: skip the "
                   "prompts of D_a for tvaccine.py --n-align N_A (the aligned model was trained on them)")
    p.add_argument("--hs-skip", type=int, default=0, metavar="K", help="with --hs-prompts: then skip the first K "
                   "prompts (e.g. those of another labelled set, so a judge's training and test prompts differ)")
    p.add_argument("--n-fa", type=int, default=500, help="FA examples (first rows of the task's eval split)")
    p.add_argument("--batch-size", type=int, default=16, help="generation and judge batch size")
    p.add_argument("--max-new-tokens-hs", type=int, default=128)
    p.add_argument("--max-new-tokens-fa", type=int, default=200)
    p.add_argument("--out", default=None, help="output folder (default runs/eval-<task>)")
    p.add_argument("--label", default=None, help="row name in report.py's tables (default: the aligned run's "
                   "method, or non-aligned)")
    p.add_argument("--seed", type=int, default=42, help="recorded with the results (decoding is greedy)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="nf4: the base in 4 bits, as the adapters "
                   "were trained with tvaccine.py / attack.py --quantize nf4 (docs/NF4.md)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.add_argument("--merge-and-export", metavar="DIR", help="write base + adapters as a plain HF checkpoint")
    p.add_argument("--rejudge", nargs="+", metavar="DIR", help="judge these evaluation folders' saved answers "
                   "again with --judge (rewrites their results.json and generations.jsonl)")
    if "--summarize" in (sys.argv[1:] if argv is None else argv):  # the old place of the tables: say where they went
        p.error("--summarize moved to report.py: python report.py DIR [DIR ...] with the same other flags")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.merge_and_export and not args.rejudge:
        args.out = args.out or f"runs/eval-{args.task}"
    return args


def check_args(args):
    for name in ("n_hs", "n_fa", "batch_size", "max_new_tokens_hs", "max_new_tokens_fa"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.hs_skip < 0 or (args.hs_skip and args.hs_prompts is None):
        raise ValueError(f"--hs-skip must be >= 0 and needs --hs-prompts (got {args.hs_skip})")


def rejudge(args):
    """Judge saved answers again (e.g. with beaver-dam once it can be downloaded), without regenerating."""
    from trainer import atomic_write_text
    judge_folder = resolve_judge(args.judge_model) if args.judge == "beaver-dam" else None
    for d in map(Path, args.rejudge):
        results = json.loads((d / "results.json").read_text())
        lines = [json.loads(l) for l in (d / "generations.jsonl").read_text().splitlines() if l.strip()]
        hs = [l for l in lines if l["kind"] == "hs"]
        harmful, scores = judge_hs(args, judge_folder, [l["prompt"] for l in hs], [l["answer"] for l in hs])
        for line, h, score in zip(hs, harmful, scores or [None] * len(hs)):
            line["harmful"] = h
            line.pop("score", None)
            if score is not None:
                line["score"] = score
        earlier = results.setdefault("HS_by_judge", {})  # what each judge said, so a re-judged table can compare
        earlier.setdefault(results.get("judge", "unknown"), results.get("HS"))
        earlier[args.judge] = 100.0 * sum(harmful) / len(harmful)
        results.update(HS=100.0 * sum(harmful) / len(harmful), judge=args.judge,
                       judge_model=args.judge_model if args.judge == "beaver-dam" else None)
        atomic_write_text(d / "generations.jsonl", "".join(json.dumps(l) + "\n" for l in lines))
        atomic_write_text(d / "results.json", json.dumps(results, indent=2, default=str))
        print(f"[eval] {d}: HS {results['HS']:.2f} (N={len(hs)}, judge: {args.judge})")


def main(argv=None):
    import dist
    args = parse_args(argv)
    check_args(args)
    if dist.parallel() and (args.merge_and_export or args.rejudge):
        raise ValueError("--merge-and-export and --rejudge run in one process: use python, not torchrun")
    if args.merge_and_export:
        return merge_and_export(args)
    if args.rejudge:
        return rejudge(args)
    return evaluate(args)


if __name__ == "__main__":
    from trainer import cli
    cli(main)
