"""The two stacks that bench.py and gpu_check.py compare, built on random weights of real shapes (no download).

- Ours: model.Transformer + lora.py, one step as tvaccine.AlignmentMethod / defences.DefenceMethod + trainer.train
  run it (`build_ours`, `ours_step`).
- The reference: HF transformers' LlamaForCausalLM + peft LoRA, doing what the public T-Vaccine code does: forward
  hooks on the attention outputs, full backward in both passes, no truncation (`build_hf`, `build_ref`,
  `ref_step`, `ref_importance`); and the public code's RepNoise terms (`public_repnoise_terms`).
- Timing (`timed`; `generation_times`, `eval_generation_times`: generate.py against transformers' generate on the
  same prompts, fixed-length and stopping at EOS as the evaluation does).
- Shared inputs: the model shapes (Llama-2 7B / 13B / 70B), random weights made once and assigned to both stacks
  (`random_state`), right-padded batches (`make_batch`), AdamW with its state present (`make_optimizer`), and the
  layer sets S of T-Vaccine (`spread`: the worst case for memory, `uniform_layers`: a flat importance).
"""
from __future__ import annotations

import functools
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import defences
from generate import generate_ids, left_padded, packed_weights
from lora import TARGETS, apply_lora, lora_parameters, set_trainable_layers
from model import ModelArgs, Transformer, rope_inv_freq
from tvaccine import perturbed_step, sft_step

RHO, RANK, ALPHA, DROPOUT = 3.0, 8, 4.0, 0.1
LLAMA2_7B = ModelArgs(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, norm_eps=1e-5)
LLAMA2_13B = ModelArgs(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, norm_eps=1e-5)
LLAMA2_70B = ModelArgs(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672,
                       norm_eps=1e-5)
METHODS = ("sft", "vaccine", "tvaccine", "repnoise", "tar")
WITH_REF = ("sft", "vaccine", "tvaccine")  # the reference stack (the public code's step) exists for these only
REPNOISE = dict(alpha=0.1, beta=0.001)  # tvaccine.py's defaults
TAR = dict(inner_steps=4, inner_lr=1e-4, tr_every=2, tr_weight=4.0)

# ----------------------------------------------------------------------------------------------------------------
# Models, batches, one full step of each stack


@functools.lru_cache(maxsize=1)
def random_state(args_repr: str, device: str, dtype) -> dict:
    """Random weights (normal(0, 0.02), norms 1) in our key names, made once and shared by the builds."""
    with torch.device("meta"):
        model = Transformer(eval(args_repr, {"ModelArgs": ModelArgs})).to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return {k: v for k, v in model.state_dict().items() if k != "inv_freq"}


def build_ours(args, device, dtype, checkpointing, state=None, dropout=DROPOUT, lora=True, quantize=None):
    """Our Transformer + LoRA with fp32 factors (as trainer.prepare_model); lora=False: the bare model;
    quantize="nf4": an NF4 base (quant.py)."""
    with torch.device("meta"):
        model = Transformer(args, checkpointing=checkpointing).to(dtype)
    if str(device) != "meta":
        model.load_state_dict(state or random_state(repr(args), str(device), dtype), assign=True, strict=False)
    model.tie_weights()
    model.inv_freq = rope_inv_freq(args, device)
    if quantize:
        import quant
        quant.quantize_model_(model)
    if lora:
        apply_lora(model, RANK, ALPHA, dropout, lora_dtype=torch.float32)
    return model.train()


def build_hf(args, device, dtype, state=None):
    """transformers' LlamaForCausalLM over the same (shared) weights, SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                      num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                      num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, rms_norm_eps=args.norm_eps,
                      rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
                      tie_word_embeddings=args.tie_embeddings, max_position_embeddings=args.max_seq_len,
                      use_cache=False, **{k: v for k, v in args.extra.items() if k.endswith("token_id")})
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg).to(dtype)
    if str(device) != "meta":
        state = state or random_state(repr(args), str(device), dtype)
        hf.load_state_dict({("" if k == "lm_head.weight" else "model.") + k: v for k, v in state.items()},
                           strict=False, assign=True)
    hf.tie_weights()
    with torch.device(device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg)  # its inv_freq buffer, computed on `device`
    return hf


def build_ref(args, device, dtype, checkpointing=False, state=None, dropout=DROPOUT):
    """HF + peft LoRA (r8, alpha 4, dropout 0.1 unless given, the same 7 targets); HF's own checkpointing if asked."""
    from peft import LoraConfig, get_peft_model
    hf = build_hf(args, device, dtype, state)
    with torch.device(device):
        ref = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout,
                                            target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    if checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    return ref.train()


def make_batch(B, T, vocab, seed, padded=True, answer_frac=0.3):
    """Right-padded rows (lengths uniform in [0.6T, T], row 0 full), labels on the last answer_frac of each row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(0.6 * T), T + 1, (B,), generator=g) if padded else torch.full((B,), T)
    lengths[0] = T
    ids, pos = torch.randint(3, vocab, (B, T), generator=g), torch.arange(T)[None]
    mask = (pos < lengths[:, None]).long()
    labels = ids.masked_fill((mask == 0) | (pos < (lengths[:, None] * (1 - answer_frac)).long()), -100)
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


def make_optimizer(params):
    """AdamW with its state present for every LoRA factor (a long T-Vaccine run ends up with all of them)."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    for p in params:
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    return opt


def finish(opt):
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def ours_step(model, opt, method, batch, S, harm=None, freeze="layers"):
    """One full step as tvaccine.AlignmentMethod / defences.DefenceMethod + trainer.train run it (the importance
    pass apart). RepNoise and TAR use `harm` as every harmful batch they draw (TAR: K attack batches + 1).
    freeze: T-Vaccine's --freeze ("attention": the MLP LoRA of every layer trains, the public code's rule)."""
    if method == "repnoise":
        set_trainable_layers(model, None)
        defences.repnoise_step(model, batch, harm, **REPNOISE)
    elif method == "tar":
        set_trainable_layers(model, None)
        defences.tar_step(model, lora_parameters(model), batch, [harm] * TAR["inner_steps"], harm, TAR["inner_lr"],
                          TAR["tr_every"], TAR["tr_weight"])
    elif method == "sft":
        set_trainable_layers(model, None)
        sft_step(model, batch)
    else:
        set_trainable_layers(model, S, freeze)
        perturbed_step(model, batch, S, RHO, freeze)
    finish(opt)


def ref_forward(ref, batch, layers=(), eps=None):
    """HF forward, loss over every position; self_attn outputs of `layers` retain their grads (+ eps if given)."""
    hs, handles = {}, []
    for l in layers:
        def hook(mod, inp, out, l=l):
            h = out[0] + eps[l] if eps is not None else out[0]
            if h.requires_grad:
                h.retain_grad()
            hs[l] = h
            return (h,) + tuple(out[1:])
        handles.append(ref.base_model.model.model.layers[l].self_attn.register_forward_hook(hook))
    try:
        return ref(**batch).loss, hs
    finally:
        for h in handles:
            h.remove()


def ref_importance(ref, harmful):
    for n, p in ref.named_parameters():
        p.requires_grad_("lora_" in n)  # before the step's freezing, as the public code
    loss, hs = ref_forward(ref, harmful, range(len(ref.base_model.model.model.layers)))
    loss.backward()  # full backward, weight gradients included, as the public code
    s = torch.stack([h.grad.float().norm() for h in hs.values()])
    ref.zero_grad(set_to_none=True)
    return s / s.sum()


def ref_step(ref, opt, method, batch, S, harm=None, public_freezing=True):
    """The public code's step: full backward in both passes; T-Vaccine freezes only other layers' attention LoRA
    (public_freezing=False: every LoRA factor outside S, as ours does, so that both steps train the same factors)."""
    if method == "sft":
        ref(**batch).loss.backward()
    else:
        for n, p in ref.named_parameters():
            if "lora_" in n:
                layer = int(n.split(".layers.")[1].split(".")[0])
                p.requires_grad_(method == "vaccine" or (public_freezing and ".mlp." in n) or layer in S)
        loss, hs = ref_forward(ref, batch, S)
        loss.backward()
        g = [hs[l].grad for l in S]
        norm = torch.sqrt(sum(x.float().pow(2).sum() for x in g))
        eps = {l: (RHO * x / (norm + 1e-7)).detach() for l, x in zip(S, g)}
        del loss, hs, g
        ref.zero_grad(set_to_none=True)
        ref_forward(ref, batch, S, eps)[0].backward()
    finish(opt)


def explicit_mmd2(x, y):
    """The public code's MMD: a (2n, 2n, D) tensor of differences, squared and kept for backward."""
    z = torch.cat([x, y])
    d = ((z[None] - z[:, None]) ** 2).sum(2)
    n, m = x.shape[0], z.shape[0]
    s = d.detach().sum() / (m * m - m)
    k = sum(torch.exp(-d / (s * 2.0 ** (i - 2))) for i in range(5))
    return (k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n]).mean()


def public_repnoise_terms(model, harmful, generator=None):
    """RepNoise's terms computed the public code's way, on our model: every (real) position through the LM head for
    each of the L + 1 hidden states (CE masked afterwards), MMD samples (B, T * dim) in the model dtype with explicit
    differences, plain autograd (every layer's softmax and differences kept until backward)."""
    ids, mask, labels = harmful["input_ids"], harmful["attention_mask"], harmful["labels"]
    B, T = labels.shape
    real = mask.bool()
    _, states = model.forward_hidden(ids, mask, record_at=real)
    nxt = torch.full_like(labels, -100)
    nxt[:, :-1] = labels[:, 1:]
    targets, where = nxt[real], real.nonzero()
    flat = where[:, 0] * T + where[:, 1]
    ce = torch.stack([F.cross_entropy(model.logits(x).float(), targets, ignore_index=-100) for x in states["residual"]])
    mmd = []
    for a in states["mlp"]:
        x = a.new_zeros(B * T, a.shape[-1]).index_copy(0, flat, a).view(B, -1)
        y = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator) * (x != 0)
        mmd.append(explicit_mmd2(x, y))
    mmd = torch.stack(mmd)
    return {"ce": ce, "H": 1 + ce.mean(), "mmd": mmd, "mmd_noise": mmd.mean()}

# ----------------------------------------------------------------------------------------------------------------
# The public code's RepNoise terms, and T-Vaccine's layer sets


def spread(L, gamma):
    """gamma layers including layer 0 (all layers above it need backward): the worst case for memory."""
    return sorted({round(i * L / gamma) for i in range(gamma)}) if gamma < L else list(range(L))


def uniform_layers(L, gamma, seed=0):
    """gamma of L layers drawn uniformly (a model whose importance is flat), sorted."""
    return sorted(torch.randperm(L, generator=torch.Generator().manual_seed(seed))[:gamma].tolist())

# ----------------------------------------------------------------------------------------------------------------
# Timing


def cpu_name() -> str:
    """The CPU's model name (timings depend on it)."""
    if not os.path.exists("/proc/cpuinfo"):
        return platform.processor()
    with open("/proc/cpuinfo") as f:
        return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())


def _sync():
    """Wait for the GPU's queued work, so that a clock read around a call covers the call's kernels."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, *args):
    """Seconds of fn(*args), logged on stderr (with the method name, when args[2] is one)."""
    _sync()
    t = time.perf_counter()
    fn(*args)
    _sync()
    dt = time.perf_counter() - t
    print(f"  [{fn.__name__} {' '.join(x for x in args[2:3] if isinstance(x, str))}: {dt:.2f} s]", file=sys.stderr,
          flush=True)
    return dt


def hf_generate_ids(hf, tok, prompts: list[str], new: int, fixed: bool = False) -> list[list[int]]:
    """transformers' greedy generate (KV cache) on the prompts left-padded as generate.generate pads them: the new
    ids of each row up to its first stop token, included. fixed: exactly `new` tokens per row (min_new_tokens)."""
    ids, mask = left_padded(tok, prompts, next(hf.parameters()).device)
    pad = tok.pad_id if tok.pad_id is not None else 0
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                          min_new_tokens=new if fixed else 0, pad_token_id=pad, eos_token_id=sorted(tok.stop_ids),
                          use_cache=True)
    if fixed and out.shape[1] != ids.shape[1] + new:
        raise RuntimeError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens per row, not {new}")
    rows = out[:, ids.shape[1]:].tolist()
    return [row[:next((i + 1 for i, t in enumerate(row) if t in tok.stop_ids), len(row))] for row in rows]


def _timed_rounds(sides: dict, rounds: int) -> tuple[dict, dict]:
    """Median seconds of each side's call over `rounds` interleaved rounds, and each side's last output."""
    times, outputs = {k: [] for k in sides}, {}
    for _ in range(rounds):
        for name, fn in sides.items():
            times[name].append(timed(_keep_output, fn, outputs, name))
    return {k: statistics.median(v) for k, v in times.items()}, outputs


def _keep_output(fn, outputs: dict, name: str):
    outputs[name] = fn()


def generation_times(model, hf, tok, prompts: list[str], new: int, rounds: int) -> dict:
    """Median seconds of generate.generate and of transformers' generate (greedy, KV cache, exactly `new` tokens per
    row on both sides: stop tokens ruled out, min_new_tokens) over `rounds` interleaved runs, after a warmup of ours;
    the prompts' shortest and longest token counts; and how many rows came out token for token equal."""
    enc = [tok.encode(p) for p in prompts]
    generate_ids(model, tok, prompts[:2], max_new_tokens=4)  # warmup
    med, out = _timed_rounds({
        "ours": lambda: generate_ids(model, tok, prompts, max_new_tokens=new, min_new_tokens=new),
        "transformers": lambda: hf_generate_ids(hf, tok, prompts, new, fixed=True)}, rounds)
    return {"ours_s": med["ours"], "hf_s": med["transformers"], "shortest": min(map(len, enc)),
            "longest": max(map(len, enc)), "identical": sum(a == b for a, b in zip(out["ours"], out["transformers"]))}


def eval_generation_times(model, hf, tok, prompts: list[str], new: int, batch: int, rounds: int) -> dict:
    """As evaluate.py answers: the prompts sorted by token count, in batches of `batch`, greedy, each row up to its
    stop token or `new` tokens; ours (packed once for all batches, as evaluate.generate_answers) against
    transformers' generate on the same batches, interleaved. Median seconds, the new tokens each side made (stop
    tokens included), the rows equal token for token, and the answers' lengths."""
    order = sorted(range(len(prompts)), key=lambda i: len(tok.encode(prompts[i])))
    batches = [[prompts[i] for i in order[s:s + batch]] for s in range(0, len(order), batch)]

    def ours():
        with packed_weights(model):
            return [row for b in batches for row in generate_ids(model, tok, b, max_new_tokens=new)]

    def transformers():
        return [row for b in batches for row in hf_generate_ids(hf, tok, b, new)]
    generate_ids(model, tok, prompts[:2], max_new_tokens=4)  # warmup
    med, out = _timed_rounds({"ours": ours, "transformers": transformers}, rounds)
    lengths = [len(r) for r in out["ours"]]
    return {"ours_s": med["ours"], "hf_s": med["transformers"], "ours_tokens": sum(lengths),
            "hf_tokens": sum(map(len, out["transformers"])), "lengths": lengths,
            "identical": sum(a == b for a, b in zip(out["ours"], out["transformers"])), "rows": len(prompts)}


def lora_shapes(args: ModelArgs) -> list[tuple[int, int]]:
    """(in, out) of every adapted linear (q, k, v, o, gate, up, down of every layer)."""
    kv = args.n_kv_heads * args.head_dim
    q = args.n_heads * args.head_dim
    per_layer = [(args.dim, q), (args.dim, kv), (args.dim, kv), (q, args.dim),
                 (args.dim, args.hidden_dim), (args.dim, args.hidden_dim), (args.hidden_dim, args.dim)]
    return per_layer * args.n_layers
