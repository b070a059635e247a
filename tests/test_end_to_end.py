"""The paper's three commands, end to end, on a tiny random model and ~20 rows per set of ../shared/data."""
import json

import attack
import evaluate
import report
import tvaccine
from conftest import shared_path


def test_align_attack_evaluate_summarize(tiny_checkpoint, tmp_path, capsys):
    data_dir = shared_path("data")
    folder, _ = tiny_checkpoint("llama", layers=4)
    common = ["--model", str(folder), "--data-dir", str(data_dir), "--max-len", "96", "--batch-size", "5",
              "--no-progress"]
    tvaccine.main(common + ["--out", str(tmp_path / "align"), "--n-align", "20", "--n-harmful", "10",
                            "--harmful-batch-size", "5", "--epochs", "1", "--gamma", "2", "--refresh-every", "2",
                            "--resample-every", "1"])
    attack.main(common + ["--out", str(tmp_path / "attack"), "--aligned", str(tmp_path / "align" / "adapter"),
                          "--task", "sst2", "--samples", "20", "--poison-ratio", "0.1",
                          "--n-harmful-defender", "10", "--epochs", "1", "--lr", "1e-4"])
    evaluate.main(["--model", str(folder), "--data-dir", str(data_dir), "--aligned",
                   str(tmp_path / "align" / "adapter"), "--attacked", str(tmp_path / "attack" / "adapter"),
                   "--task", "sst2", "--judge", "keyword", "--n-hs", "6", "--n-fa", "6", "--batch-size", "4",
                   "--max-new-tokens-hs", "8", "--max-new-tokens-fa", "4", "--out", str(tmp_path / "eval"),
                   "--no-progress"])

    for stage, files in {"align": ["adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                                   "config.json", "metrics.jsonl", "importance.jsonl", "summary.json",
                                   "checkpoint.pt"],
                         "attack": ["adapter/adapter_model.safetensors", "config.json", "metrics.jsonl",
                                    "summary.json", "checkpoint.pt"],
                         "eval": ["results.json", "generations.jsonl"]}.items():
        for name in files:
            assert (tmp_path / stage / name).is_file(), f"{stage}/{name} is missing"
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["judge"] == "keyword" and results["N_hs"] == 6 and results["N_fa"] == 6
    assert 0 <= results["HS"] <= 100 and 0 <= results["FA"] <= 100
    generations = (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()
    assert len(generations) == 12

    capsys.readouterr()
    report.main([str(tmp_path / "eval")])
    table = capsys.readouterr().out
    assert "| method |" in table and "| tvaccine |" in table and "keyword" in table
