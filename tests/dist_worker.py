"""One rank of tests/test_distributed.py, launched by torchrun: runs the stages listed in a JSON file in one
process group (one launch for every check: starting processes is the slow part on a CPU).

    torchrun --nproc_per_node 2 tests/dist_worker.py runs.json record.json

runs.json: [{"stage": "tvaccine" | "attack" | "evaluate", "argv": [...], "interrupt": null | [rank, call]}, ...];
"interrupt" raises SIGINT (Ctrl-C) in that rank only, in its call-th perturbed/SFT step; "refused": the stage must
fail with a ValueError (its message is recorded). record.json (rank 0): every rank's sampled layer sets S, in order,
the refusals' messages, and what FSDP made of a small model on each rank.
"""
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import attack  # noqa: E402
import dist  # noqa: E402
import evaluate  # noqa: E402
import tvaccine  # noqa: E402

STAGES = {"tvaccine": tvaccine.main, "attack": attack.main, "evaluate": evaluate.main}


def record_sampled_layers(log: list):
    real = tvaccine.sample_layers

    def sample(*a, **kw):
        S = real(*a, **kw)
        log.append(S)
        return S
    tvaccine.sample_layers = sample


def interrupt_in_step(rank: int, call: int):
    """Ctrl-C reaching one rank only, in the middle of a step: every rank must stop after that same step."""
    real_perturbed, real_sft, calls = tvaccine.perturbed_step, tvaccine.sft_step, {"n": 0}

    def count():
        calls["n"] += 1
        if dist.rank() == rank and calls["n"] == call:
            signal.raise_signal(signal.SIGINT)

    def perturbed(*a, **kw):
        count()
        return real_perturbed(*a, **kw)

    def sft(*a, **kw):
        count()
        return real_sft(*a, **kw)
    tvaccine.perturbed_step, tvaccine.sft_step = perturbed, sft

    def restore():
        tvaccine.perturbed_step, tvaccine.sft_step = real_perturbed, real_sft
    return restore


def fsdp_layout() -> dict:
    """dist.shard_model on a small fp32 model: this rank's bytes of base weights, FSDP units, the LoRA factors."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from lora import apply_lora, lora_parameters
    from model import ModelArgs, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**FSDP_MODEL))
    apply_lora(model, rank=4, alpha=8, dropout=0.0)
    dist.shard_model(model, lora_parameters(model), torch.device("cpu"))
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    lora = lora_parameters(model)
    return {"local_bytes": sum(p.to_local().numel() * p.element_size() for p in base),
            "all_base_sharded": all(isinstance(p, DTensor) for p in base),
            "units": sum(isinstance(m, FSDPModule) for m in model.modules()),
            "lora_whole_and_trainable": all(not isinstance(p, DTensor) and p.requires_grad for p in lora)}


FSDP_MODEL = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96)


def main(runs_file: str, record_file: str):
    torch.set_num_threads(1)  # two processes on a shared CPU
    dist.init()
    layers, refusals = [], []
    record_sampled_layers(layers)
    for run in json.loads(Path(runs_file).read_text()):
        restore = interrupt_in_step(*run["interrupt"]) if run.get("interrupt") else None
        try:
            STAGES[run["stage"]](run["argv"])
            if run.get("refused"):
                raise AssertionError(f"{run['argv']} ran under torchrun; it should have been refused")
        except SystemExit as e:  # the interrupted run: a checkpoint was saved, exit code 130
            if e.code != 130:
                raise
        except ValueError as e:
            if not run.get("refused"):
                raise
            refusals.append(str(e))
        if restore:
            restore()
    everyone, layouts = dist.gather_objects(layers), dist.gather_objects(fsdp_layout())
    if dist.is_main():
        Path(record_file).write_text(json.dumps({"sampled_layers": everyone, "world_size": dist.world_size(),
                                                 "fsdp_layout": layouts, "refusals": refusals}))
    dist.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
