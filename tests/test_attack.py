"""attack.py: the aligned adapter is merged before a fresh LoRA is trained on the poisoned task mix."""
import json
from types import SimpleNamespace

import pytest
import torch

import attack
import trainer
import tvaccine
from lora import load_adapter
from model import load_model
from test_tvaccine import write_safety


def write_sst2(folder, n=40):
    rows = [{"idx": i, "sentence": f"w{4 + i % 60} w{9 + i % 50}", "label": i % 2} for i in range(n)]
    (folder / "sst2").mkdir(parents=True, exist_ok=True)
    (folder / "sst2" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def attack_args(model, data_dir, out, *extra):
    return ["--model", str(model), "--data-dir", str(data_dir), "--out", str(out), "--samples", "20",
            "--poison-ratio", "0.2", "--n-harmful-defender", "4", "--batch-size", "5", "--epochs", "2",
            "--max-len", "64", "--lr", "1e-3", "--save-every", "3", "--no-progress", *extra]


@pytest.fixture
def aligned(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("llama", layers=3)
    data_dir = write_safety(tmp_path / "data")
    write_sst2(data_dir)
    tvaccine.main(["--model", str(folder), "--data-dir", str(data_dir), "--out", str(tmp_path / "align"),
                   "--method", "sft", "--n-align", "20", "--batch-size", "5", "--epochs", "1", "--max-len", "64",
                   "--lr", "1e-2", "--no-progress"])
    return folder, data_dir, tmp_path / "align" / "adapter"


def test_attack_merges_the_aligned_adapter_then_trains_a_fresh_one(aligned, tmp_path):
    folder, data_dir, adapter = aligned
    # the starting point of the attack = base + aligned adapter
    args = SimpleNamespace(model=str(folder), device="cpu", dtype="fp32", checkpointing=False, lora_rank=8,
                           lora_alpha=4.0, lora_dropout=0.0)
    merged, _ = trainer.prepare_model(args, adapter_to_merge=str(adapter))
    reference, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
    load_adapter(reference, adapter)
    ids = torch.randint(4, 96, (2, 9))
    merged.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), reference(ids), rtol=1e-5, atol=1e-5)

    summary = attack.main(attack_args(folder, data_dir, tmp_path / "attack", "--aligned", str(adapter)))
    assert summary["steps"] == 8 and summary["aligned"] == str(adapter)
    out = tmp_path / "attack"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "attack" and config["task"] == "sst2" and config["poison_ratio"] == 0.2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 8


def test_attack_resume_is_exact(aligned, tmp_path, monkeypatch):
    import signal
    folder, data_dir, adapter = aligned
    attack.main(attack_args(folder, data_dir, tmp_path / "full", "--aligned", str(adapter)))
    real, calls = attack.sft_step, {"n": 0}

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)
        return real(*a, **kw)
    monkeypatch.setattr(attack, "sft_step", interrupted)
    with pytest.raises(SystemExit):
        attack.main(attack_args(folder, data_dir, tmp_path / "cut", "--aligned", str(adapter)))
    monkeypatch.setattr(attack, "sft_step", real)
    attack.main(attack_args(folder, data_dir, tmp_path / "cut", "--aligned", str(adapter), "--resume"))
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, error, message", [
    (["--task", "imdb"], ValueError, "unknown task 'imdb'"),
    (["--poison-ratio", "1.5"], ValueError, "--poison-ratio must be in"),
    (["--samples", "2"], ValueError, "fewer than one batch"),
    (["--samples", "100"], ValueError, "only 40 exist"),
    (["--aligned", "/nonexistent/adapter"], FileNotFoundError, "no adapter_config.json"),
])
def test_attack_bad_input(aligned, tmp_path, extra, error, message):
    folder, data_dir, _ = aligned
    with pytest.raises(error, match=message):
        attack.main(attack_args(folder, data_dir, tmp_path / "bad", *extra))
