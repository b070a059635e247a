"""Shared test fixtures: tiny random HF checkpoints (transformers as the oracle) and the offline assets; a tiny
moderation classifier (judge.py) and aligned + attacked run folders (evaluate.py, report.py)."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("TVACCINE_SHARED", ROOT.parent / "shared"))
ARCHS = ("llama", "mistral", "qwen2", "gemma", "gemma2")


def shared_path(*parts) -> Path:
    """A file under ../shared, or skip the test when it is absent (a fresh clone has no ../shared)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


def tiny_hf_config(kind: str, vocab_size: int = 96, layers: int = 3):
    """2-3 layers, width 64, GQA, and each architecture's quirk switched on."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=5)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
    elif kind == "gemma":
        cfg = transformers.GemmaConfig(**common, head_dim=24)
    elif kind == "gemma2":  # soft-capping on, sliding window shorter than the test sequences
        cfg = transformers.Gemma2Config(**common, head_dim=24, query_pre_attn_scalar=20, sliding_window=5,
                                        attn_logit_softcapping=0.05, final_logit_softcapping=0.5)  # small: they bite
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "eager"  # the plainest reference path
    return cfg


def tiny_hf_model(kind: str, seed: int = 0, **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(kind, **kw)).eval()
    with torch.no_grad():  # random norm weights and biases, so a wrong (1 + w) or a dropped bias shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
    return model


def write_tiny_tokenizer(folder: Path, vocab_size: int):
    """A word-level tokenizer.json: <pad>=0, <s>=1, </s>=2, <unk>=3, then w4..wN (one id per word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True}))


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: save a tiny random HF model of `kind` as safetensors + tokenizer; return (folder, hf_model)."""
    def make(kind: str, **kw):
        hf = tiny_hf_model(kind, **kw)
        folder = tmp_path / kind
        hf.save_pretrained(folder, safe_serialization=True)
        write_tiny_tokenizer(folder, hf.config.vocab_size)
        return folder, hf
    return make


def tiny_classifier(folder, seed=0):
    """A tiny LlamaForSequenceClassification with BeaverDam's 14 labels, saved with a tokenizer: the oracle for
    judge.py's moderation model."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny_hf_config("llama")
    cfg.num_labels, cfg.problem_type = 14, "multi_label_classification"
    torch.manual_seed(seed)
    hf = transformers.LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
        hf.score.weight.normal_(0, 0.5)
    hf.save_pretrained(folder)
    write_tiny_tokenizer(folder, cfg.vocab_size)
    return hf


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cls")
    return folder, tiny_classifier(folder)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def setup(tiny_checkpoint, tmp_path):
    """A tiny base model, a data dir, and aligned + attacked adapters in run folders like the trainers write."""
    from lora import apply_lora, load_adapter, lora_modules, merge_and_unload, save_adapter
    from model import load_model

    folder, _ = tiny_checkpoint("llama")
    data = tmp_path / "data"
    write_jsonl(data / "safety" / "test.jsonl", [{"prompt": f"w{4 + i} w{20 + i}", "response": "", "is_safe": False,
                                                  "category": "x"} for i in range(5)])
    write_jsonl(data / "sst2" / "validation.jsonl", [{"sentence": f"w{30 + i} w{40 + i} w9", "label": i % 2}
                                                      for i in range(4)])
    runs = {}
    for stage, config in (("align", {"method": "tvaccine", "seed": 1}), ("attack", {"method": "attack"})):
        model, _ = load_model(str(folder), torch.float32, "cpu")
        if stage == "attack":
            config["aligned"] = str(runs["align"])
            load_adapter(model, runs["align"])
            merge_and_unload(model)
        apply_lora(model, rank=4, alpha=8)
        g = torch.Generator().manual_seed(len(runs))
        with torch.no_grad():
            for m in lora_modules(model):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
        run = tmp_path / stage
        runs[stage] = save_adapter(model, run / "adapter")
        (run / "config.json").write_text(json.dumps(config))
        (run / "summary.json").write_text(json.dumps({"peak_memory_gib": 1.5 if stage == "align" else 0.5}))
    (tmp_path / "align" / "importance.jsonl").write_text("".join(
        json.dumps({"step": s, "P": torch.softmax(torch.randn(3), 0).tolist()}) + "\n" for s in (0, 200, 400)))
    return folder, data, runs, tmp_path
