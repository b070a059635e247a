"""The bf16 paths of the CPU speed-up: LoRA math in the activations' dtype (against torch.autocast, which does
the same thing its own way), CPU bf16 attention in fp32 (against attention computed by hand in fp64), and the
detection of a CPU's bf16 instructions (on hand-written /proc/cpuinfo text). No timing here: speed is bench.py's."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainer
from lora import LoRALinear
from model import _sdpa

IN, OUT, R, ALPHA = 48, 40, 4, 8.0


def _pair(seed=0):
    """Our LoRALinear (bf16 base, fp32 factors, bf16 math) and the same weights as plain fp32 nn.Linears."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        base.weight.copy_(torch.randn(OUT, IN, generator=g).to(torch.bfloat16) * 0.2)
        base.bias.copy_(torch.randn(OUT, generator=g).to(torch.bfloat16) * 0.2)
    ours = LoRALinear(base, R, ALPHA, dropout=0.0, lora_dtype=torch.float32, math_in_input_dtype=True)
    with torch.no_grad():
        ours.lora_B.weight.copy_(torch.randn(OUT, R, generator=g) * 0.3)  # non-zero B: the path matters
    ref = {name: nn.Linear(*shape, bias=False) for name, shape in (("A", (IN, R)), ("B", (R, OUT)))}
    with torch.no_grad():
        ref["A"].weight.copy_(ours.lora_A.weight)
        ref["B"].weight.copy_(ours.lora_B.weight)
    return ours, ref


def test_lora_math_in_input_dtype_is_what_autocast_computes():
    """Autocast runs each linear in bf16 over fp32 weights and hands back fp32 weight gradients: our option must
    give the same output and the same fp32 gradients. Both sides run the same bf16 kernels on the same operands
    (the casts are exact copies), so the only possible difference is the order of the two additions, one bf16
    rounding step: the tolerance is 2 ulp of bf16 (2 * 2^-8 relative) on outputs of size ~1."""
    ours, ref = _pair()
    x = torch.randn(5, 7, IN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = ours(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low_rank = ref["B"](ref["A"](x) * (ALPHA / R))
    want = F.linear(x, ours.weight, ours.bias) + low_rank
    assert y.dtype == torch.bfloat16 and want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=2 ** -7, atol=2 ** -7)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y.backward(g)
    want.backward(g)
    for name, ours_w in (("A", ours.lora_A.weight), ("B", ours.lora_B.weight)):
        assert ours_w.grad.dtype == torch.float32  # fp32 master weights get fp32 gradients
        ref_grad = ref[name].weight.grad
        torch.testing.assert_close(ours_w.grad, ref_grad, rtol=2 ** -7, atol=2 ** -7 * ref_grad.abs().max().item())


def test_lora_math_in_input_dtype_is_a_no_op_in_fp32():
    """Over an fp32 base the two options are one computation (the casts are identities): equal to the last bit."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    a = LoRALinear(base, R, ALPHA, lora_dtype=torch.float32, math_in_input_dtype=False)
    b = LoRALinear(base, R, ALPHA, lora_dtype=torch.float32, math_in_input_dtype=True)
    with torch.no_grad():
        b.lora_A.weight.copy_(a.lora_A.weight)
        a.lora_B.weight.normal_()
        b.lora_B.weight.copy_(a.lora_B.weight)
    x = torch.randn(3, IN)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def _attention_fp64(q, k, v, scale):
    """Causal attention with grouped KV heads, by hand, in fp64."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale
    T = q.shape[2]
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_bf16_attention_on_cpu_matches_fp64_to_one_bf16_rounding():
    """On the CPU, bf16 q/k/v are attended in fp32 and the result rounded once to bf16: so the error against an
    fp64 reference is the final rounding (half an ulp, 2^-9 relative) plus fp32 noise (~1e-6): 2^-8 bounds it."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 9, 16, generator=g).to(torch.bfloat16)
    k = torch.randn(2, 2, 9, 16, generator=g).to(torch.bfloat16)
    v = torch.randn(2, 2, 9, 16, generator=g).to(torch.bfloat16)
    y = _sdpa(q, k, v, None, 1 / math.sqrt(16), gqa=True)
    assert y.dtype == torch.bfloat16
    want = _attention_fp64(q, k, v, 1 / math.sqrt(16))
    err = ((y.double() - want).abs() / want.abs().clamp(min=1e-2)).max().item()
    assert err <= 2 ** -8, err


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme avx2 avx512f avx512bw {extra}
bugs\t\t: sysret_ss_attrs
"""


def test_cpu_bf16_units_reads_the_flags_line():
    assert trainer.cpu_bf16_units(CPUINFO.format(extra="avx512_bf16")) == ["avx512_bf16"]
    assert trainer.cpu_bf16_units(CPUINFO.format(extra="amx_bf16 amx_tile avx512_bf16")) == ["amx_bf16",
                                                                                             "avx512_bf16"]
    assert trainer.cpu_bf16_units(CPUINFO.format(extra="")) == []
    assert trainer.cpu_bf16_units("") == []  # no /proc/cpuinfo (macOS, Windows): nothing claimed


def test_emulated_bf16_is_reported_not_replaced(monkeypatch, capsys):
    monkeypatch.setattr(trainer, "cpu_bf16_units", lambda cpuinfo=None: [])
    assert trainer.warn_if_emulated_bf16("bf16", "cpu")
    assert "without bf16 instructions" in capsys.readouterr().err
    assert not trainer.warn_if_emulated_bf16("fp32", "cpu")
    assert not trainer.warn_if_emulated_bf16("bf16", "cuda")
    monkeypatch.setattr(trainer, "cpu_bf16_units", lambda cpuinfo=None: ["avx512_bf16"])
    assert not trainer.warn_if_emulated_bf16("bf16", "cpu")
    assert capsys.readouterr().err == ""
