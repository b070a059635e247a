"""Batched decoding for evaluation: left padding, a KV cache, greedy or sampled; each row stops at its EOS.

What makes it faster than transformers' `generate` on the same model (docs/BENCHMARKS.md section 3):
- Finished rows leave the batch (`KVCache.keep`): later steps compute only the rows still answering, where
  transformers keeps feeding pads through every finished row until the last one ends.
- The prompts run over their real tokens only (model.Unpadded), not over the left padding.
- On a CPU, every plain linear is prepacked for oneDNN while decoding (`packed_weights`), with the q/k/v and the
  gate/up projections fused into one matmul each. PyTorch's F.linear sends fp32 to MKL's sgemm, which on the
  AMD EPYC we measure on runs 1.5-2.6x slower than oneDNN with a prepacked weight at 16 rows (and 1.3-1.4x at
  prompt sizes). The packed copies live only inside `packed_weights`; models above PACK_LIMIT_BYTES, GPUs, LoRA
  adapters not merged and NF4 layers keep the modules' own matmuls.
- Greedy steps on a CPU find the fp32 argmax through a bf16 copy of the LM head and a rigorous rounding bound
  (`GreedyHead`): about a third off the head's time, the same token.
All of it computes the same function as the plain forward: the answers equal transformers' greedy answers in the
same precision, except where two logits tie to within float rounding (summation order differs between kernels).
"""
from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRALinear
from model import KVCache, Transformer
from trainer import cpu_bf16_units

PACK_LIMIT_BYTES = 4 * 2 ** 30  # packing copies the weights: only for models whose weights fit twice with room
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # models inside packed_weights: their GreedyHead


def generate(model: Transformer, tokenizer, prompts: list[str], max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             min_new_tokens: int = 0) -> list[str]:
    """Answers to `prompts`, decoded up to (not including) each row's stop token; greedy unless temperature > 0
    (then sampled, reproducibly for a given seed and batch). min_new_tokens: the stop tokens are ruled out of the
    first that many steps (transformers' option of that name; the benchmark's fixed-length runs)."""
    rows = generate_ids(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed, min_new_tokens)
    return [tokenizer.decode(_until_stop(row, tokenizer.stop_ids)) for row in rows]


@torch.inference_mode()
def generate_ids(model: Transformer, tokenizer, prompts: list[str], max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 min_new_tokens: int = 0) -> list[list[int]]:
    """generate's new token ids per row, its stop token included where it made one."""
    device = next(model.parameters()).device
    ids, mask = left_padded(tokenizer, prompts, device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def choose(x, banned):  # x: (B, dim), the last position's hidden state; banned: ids ruled out, or None
        screen = _PACKED.get(model)
        if temperature <= 0 and screen is not None:
            return screen.argmax(model.norm(x), banned)
        logits = model.logits(x)
        if banned is not None:
            logits[:, banned] = float("-inf")
        return _sample(logits, temperature, top_p, gen)
    with packed_weights(model):
        return decode(model, ids, mask, max_new_tokens, tokenizer.stop_ids, choose, min_new_tokens)


def left_padded(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, T): the prompts' tokens right-aligned, so that every row's next token is at T."""
    encoded = [tokenizer.encode(p) for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("a prompt encodes to zero tokens")
    T = max(map(len, encoded))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ids = torch.tensor([[pad] * (T - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (T - len(e)) + [1] * len(e) for e in encoded], device=device)
    return ids, mask


def decode(model: Transformer, ids, mask, max_new_tokens: int, stop_ids, choose,
           min_new_tokens: int = 0) -> list[list[int]]:
    """New tokens of every row, its stop token included where it made one. `choose(x, banned) -> ids` picks each
    step's tokens from the last hidden states (banned: the stop ids in the first min_new_tokens steps, else None).
    A row leaves the batch once it has stopped (its cache rows, mask row and position go), so each
    step runs over the live rows only; the others' results do not depend on it (attention is within a row)."""
    B, T = ids.shape
    cache = KVCache(model.args, B, T + max_new_tokens, ids.device, model.embed_tokens.weight.dtype)
    # The whole mask at once: the generated positions are real tokens; step t reads its first T + t + 1 columns.
    full_mask = torch.ones(B, T + max_new_tokens, dtype=mask.dtype, device=ids.device)
    full_mask[:, :T] = mask
    stop = torch.tensor(sorted(stop_ids), device=ids.device)
    live = torch.arange(B, device=ids.device)  # the original row of each row still in the batch
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=ids.device)
    length = torch.zeros(B, dtype=torch.long, device=ids.device)  # tokens made per original row
    x, _ = model.forward_hidden(ids, mask, cache=cache)
    for t in range(max_new_tokens):
        nxt = choose(x[:, -1], stop if t < min_new_tokens else None)
        out[live, t] = nxt
        length[live] = t + 1
        stopped = torch.isin(nxt, stop)
        if t == max_new_tokens - 1:
            break
        if bool(stopped.any()):
            keep = (~stopped).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            live, nxt, full_mask = live[keep], nxt[keep], full_mask[keep]
            cache.keep(keep)
        x, _ = model.forward_hidden(nxt[:, None], full_mask[:, :cache.length + 1], cache=cache)
    return [row[:n] for row, n in zip(out.tolist(), length.tolist())]


def _sample(logits, temperature, top_p, gen):
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        sorted_p[(sorted_p.cumsum(-1) - sorted_p) > top_p] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def _until_stop(ids, stop_ids):
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i]
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Prepacked weights


class PackedLinear:
    """x W^T + b through oneDNN with W reordered once into its blocked layout (inference only, no autograd)."""

    ROWS_HINT = 16  # the batch oneDNN picks the layout for; any row count works

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), self.ROWS_HINT)
        self.bias = None if bias is None else bias.detach()
        self.out_features = weight.shape[0]

    def __call__(self, x):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def _affine(module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(W, b) when `module` computes exactly F.linear(x, W, b) now; None for NF4 layers and active adapters."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    if isinstance(module, LoRALinear) and module.base is None and (module.merged or module.disabled):
        return module.weight, module.bias
    return None


def _fused(modules) -> PackedLinear | None:
    """One PackedLinear computing every module's output side by side, or None if one of them is not plain."""
    parts = [_affine(m) for m in modules]
    if any(p is None for p in parts):
        return None
    weight = torch.cat([w for w, _ in parts]) if len(parts) > 1 else parts[0][0]
    biases = [b for _, b in parts]
    if all(b is None for b in biases):
        return PackedLinear(weight, None)
    bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for (w, _), b in zip(parts, biases)])
    return PackedLinear(weight, bias)


@functools.cache
def _native_bf16() -> bool:
    return bool(cpu_bf16_units())


def can_pack(model: Transformer) -> bool:
    """Packing pays on a CPU with oneDNN's linear ops, for fp32 / bf16 weights small enough to copy."""
    w = model.embed_tokens.weight
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    size = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return size <= PACK_LIMIT_BYTES


@contextmanager
def packed_weights(model: Transformer):
    """Inside: each sub-block's linears fused and prepacked (see PackedLinear), and the LM head prepacked, when
    can_pack says it pays; the modules' own weights are untouched, and must not change inside. Nested uses
    pack once."""
    if not can_pack(model) or model in _PACKED:
        yield model
        return
    try:
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv, o = _fused([attn.q_proj, attn.k_proj, attn.v_proj]), _fused([attn.o_proj])
            gate_up, down = _fused([mlp.gate_proj, mlp.up_proj]), _fused([mlp.down_proj])
            attn.packed = {"qkv": qkv, "o": o} if qkv and o else None
            mlp.packed = {"gate_up": gate_up, "down": down} if gate_up and down else None
        model.packed_head = _fused([model.lm_head])
        # The bf16 screen pays for an fp32 head on a CPU with bf16 instructions only (emulated bf16 is slower than
        # fp32); a soft-capped head (Gemma-2) could tie after its tanh.
        screen = (_affine(model.lm_head) is not None and model.lm_head.weight.dtype == torch.float32
                  and model.args.final_softcap is None and _native_bf16())
        _PACKED[model] = GreedyHead(model.lm_head.weight) if screen else None
        yield model
    finally:
        for block in model.layers:
            block.self_attn.packed = block.mlp.packed = None
        model.packed_head = None
        _PACKED.pop(model, None)


class GreedyHead:
    """argmax of the LM head's fp32 logits, found with a bf16 copy of the head (half the matmul's time on a CPU with
    bf16 instructions) and an fp32 recomputation of the few tokens that can win.

    Each bf16 logit z'_v is within A + u |z'_v| of the fp32 one z_v, a rigorous bound: rounding h and w_v to bf16
    (unit roundoff u = 2^-8) moves each product h_i w_i by (2u + u^2) |h_i w_i|, each side's fp32 sum adds at most
    K 2^-24 sum|h_i w_i|, sum|h_i w_i| <= |h| |w_v| (Cauchy-Schwarz), and the bf16 output adds at most 2u |z'_v|
    (one bf16 ulp: rounded to nearest or not); so A = (2u + u^2 + 2 K 2^-24) |h| max_v |w_v|. The fp32 winner then
    lies within (2A + 4u |m|) / (1 - 2u) of the best bf16 logit m, and only the tokens that close are recomputed in fp32 (the smallest id wins a tie, as in
    torch.argmax). On SmolLM2 and HS prompts that is 18 tokens per row in the median (56 on average, at most 1042
    of 49152). The winner can differ from the full fp32 head's only where two logits tie to within fp32 rounding,
    as between any two matmul kernels."""

    BLOCK = 64  # the bf16 logits are screened by blocks of this many ids first: a max over blocks is cheap

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.detach()  # (V, K) fp32
        V, K = self.weight.shape
        self.padded = -V % self.BLOCK  # zero rows up to whole blocks; their logits are set to -inf
        self.bf16 = PackedLinear(F.pad(self.weight, (0, 0, 0, self.padded)).to(torch.bfloat16), None)
        self.u = 2.0 ** -8
        # A per unit of |h|, with 1% slack for the norms' own rounding
        self.per_norm = 1.01 * (2 * self.u + self.u ** 2 + 2.2 * K * 2.0 ** -24) * self.weight.norm(dim=1).max().item()

    def argmax(self, h: torch.Tensor, banned: torch.Tensor | None = None) -> torch.Tensor:
        """h: (B, K) fp32, the final norm's output; banned: ids never chosen (None: none)."""
        B, V = h.shape[0], self.weight.shape[0]
        approx = self.bf16(h.to(torch.bfloat16)).float()  # (B, V + padded)
        approx[:, V:] = float("-inf")
        if banned is not None:
            approx[:, banned] = float("-inf")
        blocks = approx.view(B, -1, self.BLOCK)
        block_max = blocks.amax(-1)  # (B, blocks)
        m = block_max.amax(-1)
        reach = (2 * self.per_norm * h.norm(dim=1) + 4 * self.u * m.abs()) / (1 - 2 * self.u)
        threshold = m - reach
        rows, block = (block_max >= threshold[:, None]).nonzero(as_tuple=True)  # the blocks that hold a candidate
        candidates = blocks.flatten(0, 1).index_select(0, rows * blocks.shape[1] + block)  # (n, BLOCK)
        hit, offset = (candidates >= threshold.index_select(0, rows)[:, None]).nonzero(as_tuple=True)
        rows, ids = rows.index_select(0, hit), block.index_select(0, hit) * self.BLOCK + offset  # every possible winner
        exact = (h.index_select(0, rows) * self.weight.index_select(0, ids)).sum(-1)
        best = exact.new_full((B,), float("-inf")).scatter_reduce(0, rows, exact, "amax")
        won = exact == best[rows]
        return ids.new_full((B,), V).scatter_reduce(0, rows[won], ids[won], "amin")
