"""The run machinery shared by the alignment (tvaccine.py, defences.py) and the attack (attack.py) stages.

- `RunDir`: the output folder: refuses to overwrite a different run, writes the resolved config, metrics
  JSONL, atomic checkpoints (temp file + rename) and the summary.
- `train`: AdamW over the LoRA parameters, cosine schedule with warmup, grad-norm clipping, a progress bar,
  a checkpoint every N steps and on Ctrl-C, exact resume (optimizer, schedule, RNG, data order, method
  state), and a hard stop on a NaN/inf loss that keeps the last good checkpoint.
- Peak memory: `torch.cuda.max_memory_allocated` on GPU (reset when the stage starts), peak RSS on CPU.
- Under torchrun (dist.py): each rank trains on its rows of every global batch, gradients are summed over the
  ranks before clipping, and only rank 0 writes (folder, logs, checkpoints, progress bar); a checkpoint holds
  every rank's RNG state, so a run resumed with the same number of processes continues exactly.
- The command line every stage shares: `add_common_args` / `check_common_args` (flags and their checks),
  `count_layers` (depth from the config alone), `prepare_model` (load, merge, fresh LoRA), `cli` (one-line errors).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

import dist

CHECKPOINT = "checkpoint.pt"
# Keys that may differ between an interrupted run and its resumption.
RESUME_FREE_KEYS = {"resume", "overwrite", "save_every", "progress"}
# Flags added after runs were saved: a config.json without one was made with this value (the flag's default).
ADDED_KEYS = {"freeze": "layers"}

# ----------------------------------------------------------------------------------------------------------------
# The output folder


class RunDir:
    def __init__(self, path: str | Path, config: dict, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        if dist.parallel():  # resuming with another number of processes is refused as a settings change
            config = {**config, "world_size": dist.world_size()}
        self.config = config
        self.writes = dist.is_main()  # the other ranks only read (a checkpoint to resume from)
        if not self.writes:
            return
        previous = self.path / "config.json"
        if previous.exists():
            old = {**{k: v for k, v in ADDED_KEYS.items() if k in config}, **json.loads(previous.read_text())}
            if resume:
                diff = sorted(k for k in set(old) | set(config)
                              if k not in RESUME_FREE_KEYS and old.get(k) != config.get(k))
                if diff:
                    raise ValueError(f"--resume: {self.path} holds a run with other settings: "
                                     + ", ".join(f"{k}={old.get(k)!r} (now {config.get(k)!r})" for k in diff))
            elif not overwrite:
                raise ValueError(f"{self.path} already holds a run; pass --resume to continue it or "
                                 "--overwrite to start over")
            else:
                for name in (CHECKPOINT, "metrics.jsonl", "importance.jsonl", "summary.json"):
                    (self.path / name).unlink(missing_ok=True)
        elif resume:
            raise ValueError(f"--resume: {self.path} holds no run to resume")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(previous, json.dumps(config, indent=2, default=str))

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    def log(self, name: str, record: dict):
        if not self.writes:
            return
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_logs(self, step: int):
        """On resume, drop log lines written after the checkpoint, so each step appears once."""
        if not self.writes:
            return
        for name in ("metrics.jsonl", "importance.jsonl"):
            f = self.path / name
            if f.exists():
                keep = [l for l in f.read_text().splitlines() if l and json.loads(l)["step"] < step]
                atomic_write_text(f, "".join(l + "\n" for l in keep))

    def last_logged(self, name: str) -> dict:
        """The last record of a log ({} when there is none)."""
        f = self.path / name
        lines = [l for l in f.read_text().splitlines() if l.strip()] if f.exists() else []
        return json.loads(lines[-1]) if lines else {}

    def write_summary(self, summary: dict):
        if self.writes:
            atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2))


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: a power cut cannot leave a renamed, empty file
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


class UnsafeCheckpoint(RuntimeError):
    pass


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint with torch's safe unpickler: tensors, plain containers and numbers only.

    A run folder is something people copy and share; a pickle that names any other object (a function, a
    class, numpy's array reconstructor...) could run code when loaded, so it is refused, not trusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(f"{path} is not a plain checkpoint (tensors, lists, dicts, numbers) and was not "
                               f"loaded: it may have been written by another program or tampered with. Delete it "
                               f"and start over without --resume if you do not trust it. ({str(e).splitlines()[0]})"
                               ) from e


# ----------------------------------------------------------------------------------------------------------------
# Schedule, RNG, memory


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    warmup = int(math.ceil(total_steps * warmup_ratio))

    def factor(step: int) -> float:  # linear warmup from 0, then half a cosine down to 0 (as HF's schedule)
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return factor


def rng_state() -> dict:
    """Every RNG a step draws from, as tensors and plain lists (loadable with weights_only=True)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "state": list(mt_state), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_rng_state(ck: dict, path: Path) -> dict:
    """This rank's RNG state from a checkpoint; refuse one written by another number of processes."""
    written_by = ck.get("world_size", 1)
    if written_by != dist.world_size():
        raise ValueError(f"{path} was written by {written_by} process(es); resume it with the same number "
                         f"(now {dist.world_size()})")
    return ck["rng_per_rank"][dist.rank()] if written_by > 1 else ck["rng"]


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    # ru_maxrss is in KiB on Linux; it is the process's peak, model loading included
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu peak RSS (process)"


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------------------------
# The training loop


class stop_at_step_boundary_on_ctrl_c:
    """The first Ctrl-C asks the loop to finish the current step and save; a second one aborts at once.

    Saving at a step boundary keeps the checkpoint consistent (RNG, data order and optimizer all after the
    same step), which exact resumption needs."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if dist.is_main():  # under torchrun every rank gets the signal: one message
            print("\n[train] Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)",
                  file=sys.stderr)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


class NonFiniteLoss(RuntimeError):
    pass


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(model, params: list, batches, step_fn, run: RunDir, *, lr: float, epochs: int, weight_decay: float,
          warmup_ratio: float, max_grad_norm: float, save_every: int, resume: bool, method_state=None,
          progress: bool = True, desc: str = "train") -> dict:
    """Run `step_fn(step, batch) -> stats` (forward + backward) for epochs * len(batches) optimizer steps.

    method_state: an object with state_dict()/load_state_dict() (e.g. T-Vaccine's P, S and sampler), saved in
    every checkpoint so a resumed run continues exactly.
    """
    from tqdm import tqdm

    device = params[0].device
    total = epochs * len(batches)
    progress = progress and dist.is_main()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, warmup_ratio))
    named = {id(p): n for n, p in model.named_parameters()}
    start, elapsed = 0, 0.0
    if resume and run.checkpoint_path.exists():
        ck = load_checkpoint(run.checkpoint_path)
        start, elapsed = ck["step"], ck["elapsed"]
        with torch.no_grad():
            for p in params:
                p.copy_(ck["params"][named[id(p)]])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        batches.load_state_dict(ck["batches"])
        if method_state is not None:
            method_state.load_state_dict(ck["method"])
        set_rng_state(rank_rng_state(ck, run.checkpoint_path))
        run.truncate_logs(start)
        if dist.is_main():
            print(f"[{desc}] resumed at step {start}/{total} from {run.checkpoint_path}")

    def save(step):
        rng = dist.gather_objects(rng_state())  # every rank's RNG (dropout masks differ by rank)
        if not run.writes:
            return
        atomic_torch_save({
            "step": step, "elapsed": elapsed,
            "params": {named[id(p)]: p.detach().cpu() for p in params},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "batches": batches.state_dict(), "rng": rng[0],
            **({"world_size": len(rng), "rng_per_rank": rng} if len(rng) > 1 else {}),
            "method": method_state.state_dict() if method_state is not None else None,
        }, run.checkpoint_path)

    reset_peak_memory(device)
    bar = tqdm(total=total, initial=start, desc=desc, disable=not progress, dynamic_ncols=True, file=sys.stdout)
    step, last = start, {}
    with stop_at_step_boundary_on_ctrl_c() as stop:
        while step < total:
            for batch in batches:
                t0 = time.perf_counter()
                stats = step_fn(step, to_device(dist.local_rows(batch), device))
                # each rank's losses are its rows' share of the global mean: their sum is the global loss
                stats.update(dist.sum_floats({k: v for k, v in stats.items() if k.startswith("loss")}))
                if not math.isfinite(stats["loss"]):
                    raise NonFiniteLoss(f"loss is {stats['loss']} at step {step}; stopping. The last good "
                                        f"checkpoint is kept at {run.checkpoint_path} (if one was written).")
                dist.all_reduce_grads(params)  # before clipping: clip on the global batch's gradient norm
                grad_norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                                           max_grad_norm)
                current_lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)  # None grads: frozen layers get no AdamW update at all
                dt = time.perf_counter() - t0
                elapsed += dt
                last = {"step": step, **stats, "lr": current_lr, "grad_norm": float(grad_norm), "time_s": dt,
                        "peak_mem_bytes": peak_memory_bytes(device)[0]}
                run.log("metrics.jsonl", last)
                step += 1
                bar.update(1)
                bar.set_postfix({"loss": f"{stats['loss']:.4f}", "lr": f"{current_lr:.2e}",
                                 **({"layers": stats["layers"]} if "layers" in stats else {})}, refresh=False)
                stopping = dist.any_rank(stop.requested)  # every rank stops after the same step
                if (save_every and step % save_every == 0) or stopping:
                    save(step)
                if stopping:
                    bar.close()
                    if dist.is_main():
                        print(f"\n[{desc}] interrupted after step {step}: checkpoint saved to "
                              f"{run.checkpoint_path}; rerun the same command with --resume to continue.")
                    raise SystemExit(130)
                if step >= total:
                    break
    bar.close()
    if not last and start >= total:  # resumed a run that had finished: no step ran; report its last logged step
        last = run.last_logged("metrics.jsonl")
    save(step)
    peak, how = peak_memory_bytes(device)
    peak = dist.max_over_ranks(peak)  # the largest rank's: what each GPU must hold
    if dist.parallel():
        how += f", max over {dist.world_size()} processes"
    return {"steps": total, "final_loss": last.get("loss"), "train_time_s": elapsed,
            "peak_memory_bytes": peak, "peak_memory_gib": peak / 2**30, "peak_memory_kind": how}


# ----------------------------------------------------------------------------------------------------------------
# The command line every stage shares (tvaccine.py and attack.py; evaluate.py uses DTYPES and cli). It lives with
# the run machinery, not with the algorithm: it is about loading, devices and errors, the same for every method.

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_common_args(p: argparse.ArgumentParser, lr: float):
    """Flags shared with attack.py (same names, same meaning)."""
    from model import DEFAULT_MODEL
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local HF folder, .gguf file or Hub repo id")
    p.add_argument("--data-dir", default=None, help="local data folder (e.g. ../shared/data); default: the Hub")
    p.add_argument("--out", default=None, help="output folder (adapter, config, metrics, checkpoint)")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps of linear warmup")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=4.0, help="LoRA scaling = alpha / rank")
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--max-len", type=int, default=200, help="truncate examples to this many tokens")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="weights/compute (default bf16 on GPU, "
                   "fp32 on CPU)")
    p.add_argument("--lora-math", choices=("fp32", "model"), default="fp32", help="dtype of the LoRA path's "
                   "matmuls: fp32 (PEFT's way) or the model's --dtype (bf16 math over fp32 master weights: faster on "
                   "CPUs; the CPU recipes' setting, docs/BENCHMARKS.md)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="nf4: the base's layer weights in 4 bits "
                   "(QLoRA's NF4), dequantised to --dtype layer by layer; LoRA unchanged (docs/NF4.md)")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing (default: on for GPU, off for CPU)")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the frozen base weights over the "
                   "processes with FSDP (models that do not fit one GPU); LoRA stays whole on every rank")


def check_adapter_folder(flag: str, folder) -> None:
    """A flag naming an adapter folder must name one (adapter_config.json inside), before any weights are read."""
    if folder and not (Path(folder) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{flag} {folder}: no adapter_config.json there (expected an adapter folder written "
                                "by tvaccine.py or attack.py, e.g. runs/align-tvaccine/adapter)")


def cpu_bf16_units(cpuinfo: str | None = None) -> list[str]:
    """The CPU's native bf16 instructions (x86 flags amx_bf16, avx512_bf16), read from /proc/cpuinfo on Linux;
    [] where it has none or the file does not exist (then bf16 still runs, emulated, usually slower than fp32)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def warn_if_emulated_bf16(dtype: str | None, device: str | None) -> bool:
    """bf16 asked for on a CPU without bf16 instructions: say so (the run goes on in bf16, as asked)."""
    on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    if dtype != "bf16" or not on_cpu or cpu_bf16_units():
        return False
    print("warning: --dtype bf16 on a CPU without bf16 instructions (no amx_bf16 / avx512_bf16 in /proc/cpuinfo): "
          "PyTorch emulates them, usually slower than fp32 (--dtype fp32)", file=sys.stderr)
    return True


def check_common_args(args):
    """Bad hyperparameters shared with attack.py fail here, before any data or weights are read."""
    positive = {"lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size, "max_len": args.max_len,
                "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "max_grad_norm": args.max_grad_norm}
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 (got {value})")
    if not 0 <= args.warmup_ratio < 1 or not 0 <= args.lora_dropout < 1 or args.weight_decay < 0:
        raise ValueError("need 0 <= --warmup-ratio < 1, 0 <= --lora-dropout < 1 and --weight-decay >= 0")
    if args.save_every < 0:
        raise ValueError(f"--save-every must be >= 0 (got {args.save_every})")
    warn_if_emulated_bf16(args.dtype, args.device)
    if getattr(args, "quantize", None) and args.fsdp:
        raise ValueError("--quantize nf4 with --fsdp is not supported (FSDP shards dense weights); a 7B model "
                         "in NF4 fits one GPU: run without --fsdp")
    if args.fsdp and not dist.initialized():
        raise ValueError("--fsdp shards the weights over torchrun's processes: launch with "
                         "torchrun --nproc_per_node N ...")


def count_layers(model_name: str) -> int:
    """The model's depth from its config alone (no weights), to check gamma before loading anything."""
    import weights
    from model import resolve_source
    source = resolve_source(model_name)
    if source.suffix == ".gguf":
        import gguf
        reader = gguf.GGUFReader(source)
        return int(reader.fields["llama.block_count"].contents())
    return int(weights.read_config(source)["num_hidden_layers"])


def prepare_model(args, adapter_to_merge: str | None = None):
    """Load the base model, optionally fold an adapter into it, and add a fresh trainable LoRA."""
    from lora import apply_lora, load_adapter, lora_parameters, merge_and_unload
    from model import default_dtype, load_model
    device = dist.device(args.device)
    checkpointing = args.checkpointing if args.checkpointing is not None else device.type == "cuda"
    # FSDP: the whole model is built in host memory, then each rank moves only its shard to its GPU.
    fsdp = getattr(args, "fsdp", False)  # flags this function reads are the ones it needs; --fsdp is optional
    load_device = torch.device("cpu") if fsdp else device
    quantize = getattr(args, "quantize", None)
    model, tokenizer = load_model(args.model, dtype=DTYPES.get(args.dtype) or default_dtype(device),
                                  device=load_device, checkpointing=checkpointing, quantize=quantize)
    if adapter_to_merge:
        from quant import warn_if_base_differs
        warn_if_base_differs(adapter_to_merge, quantize, "the adapter to merge")
        load_adapter(model, adapter_to_merge, lora_dtype=torch.float32)  # merge in fp32, round once
        merge_and_unload(model)  # an NF4 base keeps the adapter as a frozen term: no re-quantisation
    apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
               lora_dtype=torch.float32,  # fp32 adapters over bf16 weights: AdamW updates do not round away
               math_in_input_dtype=getattr(args, "lora_math", "fp32") == "model")
    dist.broadcast_from_main(lora_parameters(model))  # every rank starts from rank 0's LoRA init
    if fsdp:
        dist.shard_model(model, lora_parameters(model), device)
    if dist.parallel():
        dist.seed_per_rank(args.seed)  # after the init: dropout masks differ across ranks
    model.train()
    return model, tokenizer


def cli(main_fn):
    """Clear one-line errors for bad input instead of tracebacks."""
    from weights import CheckpointError
    try:
        dist.init()  # joins torchrun's process group; nothing without torchrun
        main_fn()
    except (ValueError, FileNotFoundError, CheckpointError, NonFiniteLoss, RuntimeError) as e:
        where = f"[rank {dist.rank()}] " if dist.parallel() else ""
        print(f"{where}error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        dist.finish()
