"""importance.py (issue 23's diagnostic): the chunked reference P against one batch's P computed by plain autograd
on HF transformers (the oracle), the table's measures against hand-computed values, and a run end to end."""
import json

import pytest
import torch

import importance
from conftest import write_jsonl
from model import load_model


def ragged_examples(n, vocab, seed=0):
    """(ids, labels) pairs of different lengths and answer lengths, so the chunks hold different target counts."""
    g, out = torch.Generator().manual_seed(seed), []
    for i in range(n):
        length, prompt = 6 + i % 5, 2 + i % 3
        ids = torch.randint(4, vocab, (length,), generator=g).tolist()
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def test_chunked_reference_is_the_whole_batch_importance(tiny_checkpoint):
    """Oracle: HF's mean loss over all rows in one batch, a full backward, the attention outputs' gradient norms.
    Both sides run fp32 on the same weights; the chunked sum reorders the reductions only, so 1e-5 holds."""
    from data import collate
    folder, hf = tiny_checkpoint("llama", layers=3)
    ours, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
    examples = ragged_examples(7, hf.config.vocab_size)
    P = importance.importance_of(ours, examples, pad_id=0, chunk=3)  # chunks of 3, 3 and 1 rows

    batch = collate(examples, 0)
    hs, handles = {}, []
    for l, layer in enumerate(hf.model.layers):
        def keep(mod, inp, out, l=l):
            out[0].retain_grad()
            hs[l] = out[0]
        handles.append(layer.self_attn.register_forward_hook(keep))
    hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    for h in handles:
        h.remove()
    s = torch.stack([hs[l].grad.norm() for l in range(3)])
    torch.testing.assert_close(P, s / s.sum(), rtol=1e-5, atol=1e-7)


def test_compare_by_hand():
    ref = torch.tensor([0.5, 0.3, 0.1, 0.1])
    P = torch.tensor([0.2, 0.3, 0.4, 0.1])
    c = importance.compare(P, ref, gamma=2)
    assert c["tv"] == pytest.approx(0.3)  # 0.5 * (0.3 + 0 + 0.3 + 0)
    assert c["p0"] == pytest.approx(0.2)
    assert c["top_overlap"] == 1  # {0, 1} against {2, 1}


def test_runs_end_to_end(tiny_checkpoint, tmp_path, capsys):
    folder, _ = tiny_checkpoint("llama", layers=3)
    rows = [{"prompt": f"w{4 + i} w{20 + i}", "response": f"w{30 + i} w{40 + i} w{50 + i}", "is_safe": i % 3 == 0,
             "category": "x"} for i in range(12)]
    write_jsonl(tmp_path / "data" / "safety" / "train.jsonl", rows)
    out = tmp_path / "imp.json"
    text = importance.main(["--model", str(folder), "--data-dir", str(tmp_path / "data"), "--n-harmful", "8",
                            "--batch-sizes", "1,4", "--draws", "3", "--gamma", "2", "--out", str(out)])
    assert "| all 8 (reference) |" in text and "| 1 | 3 |" in text and "| 4 | 3 |" in text
    saved = json.loads(out.read_text())
    assert len(saved["reference"]) == 3 and sum(saved["reference"]) == pytest.approx(1.0)
    assert [len(saved["draws"][b]) for b in ("1", "4")] == [3, 3]
    with pytest.raises(ValueError, match="exceeds --n-harmful"):
        importance.main(["--model", str(folder), "--data-dir", str(tmp_path / "data"), "--n-harmful", "8",
                         "--batch-sizes", "9"])
