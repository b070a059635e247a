"""generate.py against transformers' generate on tiny random models: greedy answers token for token (left padding,
rows ending at their EOS at different steps, so finished rows leave the batch), fixed-length runs, sampling, and
which modules the CPU's packed weights replace.

Why exact equality holds: both sides compute the same fp32 function and differ only in summation order (oneDNN
or MKL kernels, fused projections, the prompts' real tokens only, fewer rows once a row stops): on these models
the last position's logits (scale 0.1-1.5) differ by 1e-8 to 1.2e-7, a few float32 ulps. A greedy token can flip
only where a step's two best logits are that close, so each test asserts from transformers' own scores that every
step's best logit leads the next by more than MARGIN = 1e-5, about 100 times that difference; the fixed seeds give
leads far above it, and a CPU's last-bit differences (weights or kernels) move them by ~1e-7, not enough to cross."""
import pytest
import torch

import generate as gen_mod
from conftest import ARCHS
from generate import can_pack, generate, generate_ids, packed_weights
from lora import apply_lora, disable_lora, lora_modules, merge_and_unload
from model import KVCache, load_model

MARGIN = 1e-5
PROMPTS = ["1 5 9 13 17 21 25", "1 7", "1 30 31 32 33", "1 60 61", "1 44 45 46 47 48"]  # left-padded: 2-7 tokens


class WordTok:
    """Prompts are space-separated token ids: lets tests pick exact token sequences. stop: the EOS id."""
    bos_id, pad_id, add_bos = 1, 0, True

    def __init__(self, stop: int = 2):
        self.eos_id, self.stop_ids = stop, {stop}

    def encode(self, text, bos=None, eos=False):
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special=True):
        return " ".join(map(str, ids))


def hf_greedy(hf, tok, prompts, new, **kw):
    """transformers' greedy rows (new ids up to the first stop id, included) and the smallest lead of a row's best
    logit over its second best, over the steps the rows were still running."""
    ids, mask = gen_mod.left_padded(tok, prompts, "cpu")
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                      eos_token_id=sorted(tok.stop_ids), output_scores=True, return_dict_in_generate=True, **kw)
    rows, lead = [], float("inf")
    for b, row in enumerate(out.sequences[:, ids.shape[1]:].tolist()):
        n = next((i + 1 for i, t in enumerate(row) if t in tok.stop_ids), len(row))
        rows.append(row[:n])
        for step in out.scores[:n]:
            top = step[b].float().topk(2).values
            lead = min(lead, (top[0] - top[1]).item())
    return rows, lead


def stop_token_ending_rows_apart(hf, prompts, new):
    """A token id that the unstopped greedy rows first make at different steps (some rows never): as the EOS id,
    it ends rows at different steps."""
    rows, _ = hf_greedy(hf, WordTok(stop=10 ** 6), prompts, new)  # an id never made: no row stops
    best = None
    for t in sorted({t for r in rows for t in r} - {0, 1}):
        first = [r.index(t) if t in r else None for r in rows]
        steps = {f for f in first if f is not None}
        score = (len(steps), None in first)
        if best is None or score > best[0]:
            best = score, t
    return best[1]


def clear_case(tiny_checkpoint, kind, new, **kw):
    """The first seed's tiny model (of 10) on which greedy decoding is a clear test: a stop token that ends rows at
    two or more different steps while a row runs to `new`, and no near tie (lead > MARGIN). Returns (our model, the
    tokenizer, transformers' rows, transformers' model). Which seed that is does not depend on the CPU: the leads move by ~1e-7."""
    for seed in range(10):
        folder, hf = tiny_checkpoint(kind, seed=seed)
        tok = WordTok(stop=stop_token_ending_rows_apart(hf, PROMPTS, new))
        want, lead = hf_greedy(hf, tok, PROMPTS, new, **kw)
        stopped_at = {len(r) for r in want if r[-1] in tok.stop_ids}
        if lead > MARGIN and (kw or len(stopped_at) >= 2 and any(len(r) == new for r in want)):
            return load_model(str(folder), dtype=torch.float32, device="cpu")[0], tok, want, hf
    raise AssertionError(f"{kind}: no seed of 10 gives a clear greedy test")


@pytest.fixture
def keeps(monkeypatch):
    """Records the batch size after every KVCache.keep (a row leaving the batch)."""
    sizes, keep = [], KVCache.keep

    def recording(self, rows):
        keep(self, rows)
        sizes.append(self.k.shape[1])
    monkeypatch.setattr(KVCache, "keep", recording)
    return sizes


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "modules"])
@pytest.mark.parametrize("kind", [k for k in ARCHS if k != "gemma"])  # gemma: see the fixed-length test
def test_greedy_equals_transformers_as_rows_stop_at_different_steps(kind, packed, tiny_checkpoint, keeps,
                                                                    monkeypatch):
    if not packed:
        monkeypatch.setattr(gen_mod, "can_pack", lambda model: False)  # the modules' own matmuls (a GPU's path)
    new = 12
    model, tok, want, _ = clear_case(tiny_checkpoint, kind, new)
    got = generate_ids(model, tok, PROMPTS, max_new_tokens=new)
    assert got == want
    assert keeps == sorted(keeps, reverse=True) and len(keeps) >= 2  # finished rows left the batch, twice or more
    texts = generate(model, tok, PROMPTS, max_new_tokens=new)
    assert texts == [" ".join(map(str, r[:-1] if r[-1] in tok.stop_ids else r)) for r in want]


def test_bench_timings_count_rows_and_tokens(tiny_checkpoint):
    """reference.py's two timings (bench.py section 3) on a tiny model: every row equal, the lengths as made. One
    batch (sorted by length, as evaluate.py): the same rows as clear_case checked for near ties."""
    reference = pytest.importorskip("reference")
    model, tok, want, hf = clear_case(tiny_checkpoint, "llama", 12)
    e = reference.eval_generation_times(model, hf, tok, PROMPTS, 12, batch=len(PROMPTS), rounds=1)
    assert e["identical"] == e["rows"] == len(PROMPTS) and e["ours_tokens"] == e["hf_tokens"]
    assert sorted(e["lengths"]) == sorted(map(len, want))
    g = reference.generation_times(model, hf, tok, PROMPTS, 6, rounds=1)
    assert g["identical"] == len(PROMPTS) and (g["shortest"], g["longest"]) == (2, 7)


@pytest.mark.parametrize("kind", ARCHS)
def test_fixed_length_equals_transformers_min_new_tokens(kind, tiny_checkpoint):
    """Every architecture, gemma included: its tiny random model repeats its prompt's last token (tied embeddings
    scaled by sqrt(dim) dominate), so no stop token can end its rows at different steps; here none may end them."""
    new = 10
    model, tok, want, _ = clear_case(tiny_checkpoint, kind, new, min_new_tokens=new)
    got = generate_ids(model, tok, PROMPTS, max_new_tokens=new, min_new_tokens=new)
    assert got == want and all(len(r) == new for r in got)


def greedy_uncached(model, ids, n, stop):
    """Greedy decoding by the plain forward over the whole sequence at every step: no cache, no packing."""
    ids, out = list(ids), []
    for _ in range(n):
        with torch.no_grad():
            out.append(model(torch.tensor([ids]))[0, -1].argmax().item())
        if out[-1] == stop:
            break
        ids.append(out[-1])
    return out


@pytest.mark.parametrize("kind", ["llama", "gemma2"])  # gemma2: sliding window and soft-capping through the cache
def test_batched_equals_one_prompt_at_a_time_and_no_cache(kind, tiny_checkpoint):
    model, tok, _, _ = clear_case(tiny_checkpoint, kind, 10)
    batched = generate_ids(model, tok, PROMPTS, 10)
    assert batched == [generate_ids(model, tok, [p], 10)[0] for p in PROMPTS]
    assert batched == [greedy_uncached(model, tok.encode(p), 10, tok.eos_id) for p in PROMPTS]


def test_sampling_is_reproducible_for_a_seed(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen2")
    model, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
    tok = WordTok(stop=7)
    kw = dict(max_new_tokens=16, temperature=1.5, top_p=0.95)
    a = generate_ids(model, tok, PROMPTS, seed=3, **kw)
    assert a == generate_ids(model, tok, PROMPTS, seed=3, **kw)
    assert a != generate_ids(model, tok, PROMPTS, seed=4, **kw)
    assert a != generate_ids(model, tok, PROMPTS, max_new_tokens=16)  # sampled, not greedy
    vocab = model.args.vocab_size
    assert all(0 <= t < vocab for r in a for t in r)
    assert all(r[-1] == 7 or len(r) == 16 for r in a) and all(7 not in r[:-1] for r in a)


def test_packed_weights_only_where_a_module_is_a_plain_linear(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    model, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
    if not can_pack(model):
        pytest.skip("this PyTorch build has no oneDNN linear ops")
    apply_lora(model, rank=4, alpha=8)
    for m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.2)
    with packed_weights(model):  # adapters active: the layers keep their modules; the head is a plain linear
        assert all(b.self_attn.packed is None and b.mlp.packed is None for b in model.layers)
        assert model.packed_head is not None
    with disable_lora(model), packed_weights(model):
        assert all(b.self_attn.packed is not None and b.mlp.packed is not None for b in model.layers)
        with packed_weights(model):  # nested: packed once, still packed after the inner block
            pass
        assert model.layers[0].mlp.packed is not None
    assert model.packed_head is None and all(b.mlp.packed is None for b in model.layers)
    merge_and_unload(model)  # merged: plain linears again, packed; the same logits within fp32 rounding
    ids, mask = gen_mod.left_padded(WordTok(), PROMPTS, "cpu")
    with torch.no_grad():
        plain = model(ids, mask)
        with packed_weights(model):
            assert model.layers[0].self_attn.packed is not None
            packed = model(ids, mask)
    assert torch.allclose(packed[mask.bool()], plain[mask.bool()], rtol=0, atol=1e-5)


def test_greedy_head_finds_the_fp32_argmax():
    """The bf16 screen of GreedyHead keeps every token that can win: random heads and states, exact ties (the
    smallest id wins, as torch.argmax), banned ids, and two logits 1e-3 apart near 10 (bf16 cannot tell them apart:
    its resolution there is 0.06; fp32 can, to 1e-6)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN")
    g = torch.Generator().manual_seed(0)
    for V, K, scale in ((300, 64, 1.0), (1000, 96, 5.0), (4099, 64, 0.2)):  # 4099: not a whole number of blocks
        h = torch.randn(8, K, generator=g)
        w = torch.randn(V, K, generator=g) * scale
        w[5] = w[17] = 3 * scale * K ** 0.5 * h[0] / h[0].norm()  # the best logit of state 0, twice: a tie
        head = gen_mod.GreedyHead(w)
        assert torch.equal(head.argmax(h), (h @ w.T).argmax(-1)) and head.argmax(h)[0].item() == 5
        banned = (h @ w.T).argmax(-1).unique()
        want = (h @ w.T).index_fill(1, banned, float("-inf")).argmax(-1)
        assert torch.equal(head.argmax(h, banned), want)
    h = torch.randn(4, 64, generator=g)
    w = torch.randn(500, 64, generator=g) * 0.1
    w[123] = 10 * h[0] / h[0].norm() ** 2  # logit 10 for row 0
    w[321] = w[123] + 1e-3 * h[0] / h[0].norm() ** 2  # logit 10.001
    assert gen_mod.GreedyHead(w).argmax(h)[0].item() == 321 == (h @ w.T).argmax(-1)[0].item()
