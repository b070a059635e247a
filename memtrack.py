"""Peak memory of one training run: measured for real (CUDA, CPU) or predicted on the `meta` device.

- `LiveBytes`: a TorchDispatchMode that counts live tensor bytes op by op (each storage from the op that makes it
  until it is freed; parameters, gradients and optimizer state included). Run under it on the `meta` device, the
  real alignment code executes at full size with no data and no compute; small integer tensors carry CPU "shadow"
  values, so data-dependent control flow and shapes are exact.
- `fused_sdpa_on_meta`, `gpu_dropout`: make the meta run take the code paths of a GPU (fused attention, F.dropout).
- `peak_memory(stack, ...)`: one stack of reference.py (ours with / without checkpointing, the HF + peft
  reference with / without HF's checkpointing) over full steps: `torch.cuda.max_memory_allocated` on CUDA, the
  tracker on cpu / meta (+ the CPU allocator's own peak from the profiler, `allocator_peak`).
- `memory_validation`: meta against real CPU runs and the tracker against the allocator (bench.py section 1).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import tempfile
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

import lora
import model as model_py  # its CPU attention switch (gpu_attention); `model` names models below
from model import ModelArgs
from reference import (LLAMA2_7B, WITH_REF, build_ours, build_ref, make_batch, make_optimizer, ours_step,
                       random_state, ref_importance, ref_step, spread)
from tvaccine import layer_importance

GiB, MiB = 2 ** 30, 2 ** 20

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


@contextlib.contextmanager
def gpu_attention():
    """bf16 attention in bf16 (the GPU's path) also for real CPU runs, which otherwise attend in fp32 (model._sdpa):
    the CPU runs that validate the meta runs then hold the tensors a GPU holds, as with gpu_dropout."""
    before = model_py.CPU_BF16_ATTENTION_IN_FP32
    model_py.CPU_BF16_ATTENTION_IN_FP32 = False
    try:
        yield
    finally:
        model_py.CPU_BF16_ATTENTION_IN_FP32 = before

# ----------------------------------------------------------------------------------------------------------------
# Peak memory of a stack's steps


STACKS = {"ours": "ours, checkpointing (GPU default)", "ours-nockpt": "ours, no checkpointing",
          "ref": "reference HF+peft", "ref-ckpt": "reference + HF checkpointing"}


def peak_memory(stack, args, method, device, S, batch, harm, dtype=torch.bfloat16, steps=2, profile=False,
                importance=True, copy_weights=False, quantize=None, freeze="layers"):
    """{phase: peak bytes, "peak", "weights"} over `steps` full steps (step 0 starts with T-Vaccine's importance
    pass), weights included. cuda: max_memory_allocated; cpu/meta: LiveBytes (+ with profile=True on the CPU,
    "allocator": the CPU allocator's own peak). copy_weights: hold a copy of the base weights throughout (the
    public TAR code's unused deep copy of the model). quantize="nf4": our stack over an NF4 base. freeze: ours,
    T-Vaccine's --freeze (the reference stack always freezes the public code's way: attention LoRA only)."""
    ours = stack.startswith("ours")
    model = build_ours(args, device, dtype, stack == "ours", quantize=quantize) if ours else \
        build_ref(args, device, dtype, stack == "ref-ckpt")
    step, imp = (functools.partial(ours_step, freeze=freeze), layer_importance) if ours else (ref_step, ref_importance)
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
    with fused_sdpa_on_meta(), gpu_dropout(), gpu_attention(), LiveBytes() as mem:
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

