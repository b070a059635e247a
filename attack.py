"""Harmful fine-tuning (the attack, SPEC section 1.2): plain SFT of a fresh LoRA on a benign task mixed with a
fraction p of harmful (prompt, harmful answer) pairs, on top of the aligned model.

    python attack.py --model llama2-7b --aligned runs/align-tvaccine/adapter --task sst2 --poison-ratio 0.1 \
        --samples 1000

- The aligned adapter is merged into the base weights first (none = the "non-aligned" baseline).
- The poison rows are BeaverTails unsafe pairs disjoint from the defender's D_h (data.attack_set).
- Same run machinery as tvaccine.py: outputs, progress bar, checkpoint/--resume, bad-input errors.
"""
from __future__ import annotations

import argparse

import dist
from trainer import add_common_args, check_adapter_folder, check_common_args, cli, count_layers, prepare_model
from tvaccine import sft_step


def parse_args(argv=None) -> argparse.Namespace:
    import data
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, lr=1e-5)
    p.add_argument("--aligned", default=None, help="aligned adapter folder to merge first (none: non-aligned)")
    p.add_argument("--task", default="sst2", help=f"benign task: one of {', '.join(data.TASKS)}")
    p.add_argument("--poison-ratio", type=float, default=0.1, help="p: fraction of harmful rows")
    p.add_argument("--samples", type=int, default=1000, help="n: rows in the fine-tuning set")
    p.add_argument("--n-harmful-defender", type=int, default=200,
                   help="unsafe rows the defender used as D_h; the poison is taken after them (disjoint)")
    args = p.parse_args(argv)
    args.method = "attack"
    args.out = args.out or f"runs/attack-{args.task}-p{args.poison_ratio}"
    return args


def check_attack_args(args):
    import data
    check_common_args(args)
    if args.task not in data.TASKS:
        raise ValueError(f"unknown task {args.task!r}; choose one of {', '.join(data.TASKS)}")
    if not 0 <= args.poison_ratio <= 1:
        raise ValueError(f"--poison-ratio must be in [0, 1] (got {args.poison_ratio})")
    if args.samples < args.batch_size:
        raise ValueError(f"--samples {args.samples} is fewer than one batch of {args.batch_size}")
    check_adapter_folder("--aligned", args.aligned)


def load_attack_data(args, tokenizer):
    import data
    task_rows = data.LOADERS[args.task]("train", args.data_dir)
    safety_rows = data.load_safety("train", args.data_dir)
    rows = data.attack_set(task_rows, safety_rows, args.task, n=args.samples, p=args.poison_ratio,
                           n_harmful_defender=args.n_harmful_defender, seed=args.seed)
    examples = data.tokenize_dataset(tokenizer, rows, args.max_len, f"attack set ({args.task})")
    dist.check_split(len(examples), args.batch_size, "--batch-size", "the attack set")
    return data.Batches(examples, args.batch_size, data.pad_id_of(tokenizer), seed=args.seed)


def main(argv=None):
    from lora import lora_parameters, save_adapter
    from trainer import RunDir, seed_everything, train

    args = parse_args(argv)
    check_attack_args(args)
    count_layers(args.model)  # resolves the model (and fails on a bad name) before anything heavy
    run = RunDir(args.out, vars(args), resume=args.resume, overwrite=args.overwrite)
    seed_everything(args.seed)
    model, tokenizer = prepare_model(args, adapter_to_merge=args.aligned)
    batches = load_attack_data(args, tokenizer)
    summary = train(model, lora_parameters(model), batches, lambda step, batch: {"loss": sft_step(model, batch)},
                    run, lr=args.lr, epochs=args.epochs, weight_decay=args.weight_decay,
                    warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
                    save_every=args.save_every, resume=args.resume, progress=args.progress, desc="attack")
    if dist.is_main():
        save_adapter(model, run.path / "adapter", base_model_name_or_path=args.model)
    summary.update(method="attack", model=args.model, aligned=args.aligned, task=args.task)
    if dist.parallel():
        summary.update(processes=dist.world_size(), fsdp=args.fsdp)
    run.write_summary(summary)
    dist.barrier()  # the adapter is on disk when any rank returns
    if dist.is_main():
        print(f"[attack] done: {summary['steps']} steps in {summary['train_time_s']:.1f}s, final loss "
              f"{summary['final_loss']:.4f}; adapter in {run.path / 'adapter'}")
    return summary


if __name__ == "__main__":
    cli(main)
