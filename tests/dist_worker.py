"""One rank of tests/test_distributed.py, launched by torchrun: runs the stages listed in a JSON file in one
process group (one launch for every check: starting processes is the slow part on a CPU).

    torchrun --nproc_per_node 2 tests/dist_worker.py runs.json record.json

runs.json: [{"stage": "tvaccine" | "attack" | "evaluate", "argv": [...], "interrupt": null | [rank, call]}, ...];
"interrupt" raises SIGINT (Ctrl-C) in that rank only, in its call-th perturbed/SFT step. record.json (rank 0):
every rank's sampled layer sets S, in order, for the test to compare.
"""
import json
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

torch.set_num_threads(1)

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


def main(runs_file: str, record_file: str):
    dist.init()
    layers = []
    record_sampled_layers(layers)
    for run in json.loads(Path(runs_file).read_text()):
        restore = interrupt_in_step(*run["interrupt"]) if run.get("interrupt") else None
        try:
            STAGES[run["stage"]](run["argv"])
        except SystemExit as e:  # the interrupted run: a checkpoint was saved, exit code 130
            if e.code != 130:
                raise
        if restore:
            restore()
    everyone = dist.gather_objects(layers)
    if dist.is_main():
        Path(record_file).write_text(json.dumps({"sampled_layers": everyone, "world_size": dist.world_size()}))
    dist.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
