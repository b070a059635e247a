"""Shared test fixtures: tiny random HF checkpoints (transformers as the oracle) and the offline assets."""
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
