"""Checkpoints that survive a hard kill and cannot run code.

- A run killed with SIGKILL (no handler runs: a power cut, the OOM killer, `kill -9`) right after a periodic
  checkpoint, or in the middle of writing one, resumes with --resume to a bitwise identical adapter.
- A checkpoint is read with torch's weights-only unpickler: a crafted pickle that would run code is refused
  with an error naming the file, and its payload never runs.
"""
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tvaccine
from test_tvaccine import adapter_tensors, cli_args, write_safety
from trainer import UnsafeCheckpoint, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent

# Runs tvaccine.main in a fresh process, one thread (so the full run and the killed/resumed one use the same
# kernels), and kills itself with SIGKILL at a chosen point: `step:N` in the middle of the N-th step's
# perturbed_step call, `save:N` halfway through writing the N-th checkpoint (half the bytes are on disk).
DRIVER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import torch
    torch.set_num_threads(1)
    import tvaccine
    kill, argv = sys.argv[1], sys.argv[2:]
    what, n = kill.split(":") if kill != "none" else ("none", "0")
    calls = {{"n": 0}}
    if what == "step":
        real_step = tvaccine.perturbed_step
        def step(*a, **kw):
            calls["n"] += 1
            if calls["n"] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(*a, **kw)
        tvaccine.perturbed_step = step
    elif what == "save":
        real_save = torch.save
        def save(obj, f, *a, **kw):
            calls["n"] += 1
            if calls["n"] == int(n):
                import io
                buffer = io.BytesIO()
                real_save(obj, buffer, *a, **kw)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **kw)
        torch.save = save
    tvaccine.main(argv)
""")


def run_driver(tmp_path, kill: str, argv: list[str]) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(driver), kill, *argv], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture
def setting(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("llama", layers=4)
    data_dir = write_safety(tmp_path / "data")
    full = run_driver(tmp_path, "none", cli_args(folder, data_dir, tmp_path / "full"))  # 12 steps, save every 2
    assert full.returncode == 0, full.stderr
    return folder, data_dir


@pytest.mark.parametrize("kill, checkpoint_step", [
    ("step:6", 4),   # mid step 5 (0-based): the checkpoint of step 4 is the last one
    ("save:3", 4),   # halfway through writing the step-6 checkpoint: step 4's must survive
])
def test_sigkill_then_resume_gives_bitwise_the_same_adapter(setting, tmp_path, kill, checkpoint_step):
    folder, data_dir = setting
    cut = tmp_path / "cut"
    killed = run_driver(tmp_path, kill, cli_args(folder, data_dir, cut))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (cut / "adapter").exists()
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == checkpoint_step
    if kill.startswith("save"):
        partial = cut / "checkpoint.pt.tmp"
        assert partial.exists() and partial.stat().st_size > 0
        with pytest.raises(Exception):  # the half-written file really is unreadable
            torch.load(partial, weights_only=True)
    resumed = run_driver(tmp_path, "none", cli_args(folder, data_dir, cut, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {checkpoint_step}/12" in resumed.stdout
    full, got = adapter_tensors(tmp_path / "full"), adapter_tensors(cut)
    assert full.keys() == got.keys() and all(torch.equal(full[k], got[k]) for k in full)


class Payload:
    """Unpickling this calls exec(code): what a malicious checkpoint would do."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def malicious_checkpoint(path: Path, marker: Path):
    code = f"open({str(marker)!r}, 'w').write('code ran')"
    torch.save({"step": 2, "params": {}, "extra": Payload(code)}, path)


def test_the_crafted_pickle_does_run_code_when_trusted(tmp_path):
    """The payload is real: the unsafe loader executes it (so the refusal below is what stops it)."""
    marker = tmp_path / "marker"
    malicious_checkpoint(tmp_path / "checkpoint.pt", marker)
    torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert marker.read_text() == "code ran"


def test_a_malicious_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    malicious_checkpoint(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(UnsafeCheckpoint, match=str(tmp_path / "checkpoint.pt")):
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists()


def test_resume_refuses_a_malicious_checkpoint(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("llama", layers=4)
    data_dir = write_safety(tmp_path / "data")
    out = tmp_path / "out"
    tvaccine.main(cli_args(folder, data_dir, out, "--epochs", "1"))
    marker = tmp_path / "marker"
    malicious_checkpoint(out / "checkpoint.pt", marker)
    with pytest.raises(UnsafeCheckpoint, match="checkpoint.pt is not a plain checkpoint"):
        tvaccine.main(cli_args(folder, data_dir, out, "--epochs", "1", "--resume"))
    assert not marker.exists()


def test_our_checkpoints_hold_only_plain_types(tiny_checkpoint, tmp_path):
    """Every method's checkpoint (T-Vaccine's P, S and sampler, RepNoise, TAR) loads with weights_only=True, and the
    RNG states it restores are the ones saved (python, numpy, torch)."""
    import random

    import numpy as np

    from trainer import rng_state, set_rng_state
    folder, _ = tiny_checkpoint("llama", layers=4)
    data_dir = write_safety(tmp_path / "data")
    for method in ("tvaccine", "vaccine", "sft", "repnoise", "tar"):
        out = tmp_path / method
        tvaccine.main(cli_args(folder, data_dir, out, "--method", method, "--epochs", "1"))
        ck = load_checkpoint(out / "checkpoint.pt")
        assert ck["step"] == 6
    state = rng_state()
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    torch.save(state, tmp_path / "rng.pt")
    random.random(), np.random.rand(), torch.rand(1)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws
