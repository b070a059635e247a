"""Opt-in 4-bit NormalFloat (NF4) frozen base weights, QLoRA-style (Dettmers et al. 2023, arXiv 2305.14314).

`--quantize nf4` stores the linear weights of every layer (q, k, v, o, gate, up, down) in 4 bits; embeddings, norms
and the LM head stay in the compute dtype, and LoRA is unchanged (its fp32 factors train as before).

- Layout: torchao's `NF4Tensor`, field for field, so a test can compare bit for bit. The weight is flattened and
  cut into blocks of 64; each block is divided by its absmax and each value replaced by the index of the nearest
  of the 16 NF4 levels, two 4-bit indices per byte (first value in the high nibble). The block absmaxes are
  double-quantised: their mean is subtracted, then they are cut into groups of 256, each group scaled by
  256 / (2 * its absmax) and rounded to int8. Bytes per weight: 1/2 + 1/64 + 4/16384. All arithmetic runs in
  the dtype the weight is quantised in (the model's compute dtype), as torchao does with its input.
  One extension: torchao asks for a number of blocks divisible by 256; here the last group may be shorter (SmolLM2's
  attention weights have 5184 and 1728 blocks). Shapes torchao accepts give exactly its bytes.
- `NF4Linear`: holds those bytes as buffers; its forward dequantises the weight in the compute dtype, multiplies,
  and drops it. Backward dequantises again instead of keeping it (`_DequantizedLinear`), so at most one layer's
  dense weight is alive at any time, with or without activation checkpointing, and recomputation in a
  checkpointed backward dequantises once more. Layers below T-Vaccine's min(S) run under no_grad and save nothing.
- Loading: `build_from_tensors(..., quantize="nf4")` (model.py) quantises each layer weight as the checkpoint
  reader yields it (`quantize_weight`), so host memory holds one dense tensor at a time, never the whole model.
- Merging (attack stage, evaluation, `--init-adapter`): folding B A into NF4 weights would re-quantise them, and the
  rounding (a step of ~1/8 of a block's absmax) is far larger than the LoRA update. So `lora.merge_and_unload`
  keeps each adapter as a frozen low-rank term inside its NF4Linear (`freeze_adapter`): the merged model computes
  exactly what was trained. `dequantize_model_` turns the layers back into dense nn.Linear (dequantised weight +
  the frozen terms, in fp32, rounded once) for `evaluate.py --merge-and-export`. Caveat, as with QLoRA: an adapter
  trained on the NF4 base and merged into the original (unquantised) base is not the model that was trained.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import TARGETS

METHODS = ("nf4",)
BLOCK, SCALER_BLOCK = 64, 256
# The 16 NF4 levels as torchao writes them (4 decimals; the QLoRA paper's exact values differ by < 5e-5, far below
# the spacing of the levels, >= 0.08). Kept identical so that the codes match torchao's bit for bit.
NF4_LEVELS = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
              0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0)
CHUNK = 1 << 18  # values matched against the 16 levels at once: (CHUNK, 16) differences, 8-16 MiB of scratch
_LAYER_WEIGHT = re.compile(rf"layers\.\d+\.(self_attn|mlp)\.({'|'.join(TARGETS)})\.weight")


def check_method(quantize: str | None):
    """None (dense base) or one of METHODS; anything else is refused, not ignored."""
    if quantize is not None and quantize not in METHODS:
        raise ValueError(f"--quantize {quantize!r} is not supported; choose {' or '.join(METHODS)} "
                         "(or leave it out for a dense base)")


# ----------------------------------------------------------------------------------------------------------------
# Quantise / dequantise


def quantize_nf4(w: torch.Tensor, name: str = "weight") -> dict[str, torch.Tensor]:
    """The NF4 bytes of `w`, computed in w's dtype: packed (uint8), scalers (int8, one per block of 64),
    scaler_factors (fp32, one per group of 256 blocks), scaler_mean (fp32 scalar)."""
    if w.numel() % BLOCK:
        raise ValueError(f"--quantize nf4: {name} has {w.numel()} values, not a multiple of the block size {BLOCK}; "
                         "this model's linear layers cannot be stored in NF4")
    if not w.is_floating_point():
        raise ValueError(f"--quantize nf4: {name} is {w.dtype}, not a floating-point weight")
    blocks = w.detach().reshape(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scalers, factors, mean = _double_quantize(absmax)
    codes = _nearest_levels(blocks, absmax)
    return {"packed": (codes[0::2] << 4) | codes[1::2], "scalers": scalers,
            "scaler_factors": factors, "scaler_mean": mean}


def _double_quantize(absmax: torch.Tensor):
    """int8 codes of (absmax - mean), groups of 256 each scaled by 256 / (2 * group absmax)."""
    mean = absmax.mean()
    groups = _groups(absmax - mean)  # zero padding of a short last group leaves its absmax unchanged
    gmax = groups.abs().amax(dim=1)
    # A group of 256 equal absmaxes has gmax 0 (torchao then divides by 0): any finite factor gives codes 0.
    factor = torch.where(gmax > 0, 256 / (2 * gmax), torch.ones_like(gmax))
    codes = (groups * factor[:, None]).round().clamp(-128, 127).to(torch.int8)
    return codes.flatten()[:absmax.numel()].clone(), factor.float(), mean.float()  # clone: no padding kept


def _groups(x: torch.Tensor) -> torch.Tensor:
    """x (1-D) as rows of SCALER_BLOCK, the last row zero-padded."""
    return F.pad(x, (0, -x.numel() % SCALER_BLOCK)).view(-1, SCALER_BLOCK)


def _nearest_levels(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level of each value / its block's absmax (the lowest index on a tie), as uint8."""
    levels = torch.tensor(NF4_LEVELS, dtype=blocks.dtype, device=blocks.device)
    # An all-zero block would give 0 / 0; dividing it by 1 instead gives the level 0.0, and changes no other block.
    scaled = (blocks / absmax.masked_fill(absmax == 0, 1)[:, None]).flatten()
    codes = torch.empty(scaled.numel(), dtype=torch.uint8, device=blocks.device)
    for start in range(0, scaled.numel(), CHUNK):  # bounded scratch: CHUNK x 16 differences at a time
        part = scaled[start:start + CHUNK]
        codes[start:start + CHUNK] = (part[:, None] - levels).abs().argmin(dim=1)
    return codes


def dequantize_nf4(q: dict[str, torch.Tensor], shape, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of `q` in `dtype` (the dtype it was quantised in gives torchao's values bit for bit)."""
    packed = q["packed"]
    levels = torch.tensor(NF4_LEVELS, dtype=dtype, device=packed.device)
    # byte b = 16 * hi + lo -> (level[hi], level[lo]): one lookup yields both values of a byte, in order. (Expanded
    # views, not repeat_interleave, whose CPU kernel allocates index tensors that meta does not: bench.py's tracker.)
    pairs = torch.stack([levels[:, None].expand(16, 16), levels[None, :].expand(16, 16)], dim=-1).view(256, 2)
    values = pairs.index_select(0, packed.int()).view(-1, BLOCK)  # int32 indices: half the bytes of int64
    return values.mul_(_block_scales(q, dtype)[:, None]).view(shape)


def _block_scales(q: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The blocks' absmaxes back from their int8 codes: code / factor + mean, rounded to dtype as torchao does."""
    codes = q["scalers"]
    groups = _groups(codes.float())  # int8 -> fp32 is exact; fp32 division, then one rounding to dtype
    scales = (groups / q["scaler_factors"][:, None]).flatten()[:codes.numel()]
    return scales.to(dtype) + q["scaler_mean"].to(dtype)


def nf4_nbytes(numel: int) -> int:
    """Bytes of one NF4 weight of `numel` values: packed codes, int8 scalers, fp32 factors and mean."""
    n_blocks = numel // BLOCK
    return numel // 2 + n_blocks + 4 * (-(-n_blocks // SCALER_BLOCK)) + 4


# ----------------------------------------------------------------------------------------------------------------
# The layer


class _DequantizedLinear(torch.autograd.Function):
    """F.linear(x, W, b) with W dequantised for the product only. Backward needs W for dL/dx: it dequantises
    again rather than keeping it (as bitsandbytes' 4-bit matmul does); W itself gets no gradient."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantized(), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad @ ctx.layer.dequantized() if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4: y = x W^T + b (+ the frozen adapters merged into it)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype  # quantised in it, dequantised to it
        numel = in_features * out_features
        if numel % BLOCK:
            raise ValueError(f"--quantize nf4: a {out_features} x {in_features} weight has {numel} values, not a "
                             f"multiple of the block size {BLOCK}")
        n_blocks = numel // BLOCK
        kw = dict(device=device)
        self.register_buffer("packed", torch.empty(numel // 2, dtype=torch.uint8, **kw))
        self.register_buffer("scalers", torch.empty(n_blocks, dtype=torch.int8, **kw))
        self.register_buffer("scaler_factors", torch.empty(-(-n_blocks // SCALER_BLOCK), dtype=torch.float32, **kw))
        self.register_buffer("scaler_mean", torch.empty((), dtype=torch.float32, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None
        self.frozen_scalings: list[float] = []  # alpha / r of each adapter merged by freeze_adapter, in order

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "NF4Linear":
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        if not w.is_meta:  # meta (bench.py's tracker) has no values: the buffers' shapes are all there is
            for name, t in quantize_nf4(w, "weight").items():
                setattr(layer, name, t)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def dequantized(self) -> torch.Tensor:
        return dequantize_nf4(self.nf4_state(), (self.out_features, self.in_features), self.compute_dtype)

    def nf4_state(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("packed", "scalers", "scaler_factors", "scaler_mean")}

    def forward(self, x):
        y = _DequantizedLinear.apply(x, self.bias, self)
        for i, scaling in enumerate(self.frozen_scalings):  # the same ops as LoRALinear's adapter path
            a, b = getattr(self, f"frozen_A_{i}"), getattr(self, f"frozen_B_{i}")
            y = y + F.linear(F.linear(x.to(a.dtype), a) * scaling, b).to(y.dtype)
        return y

    @torch.no_grad()
    def freeze_adapter(self, lora_linear):
        """Keep a trained adapter (a lora.LoRALinear over this layer) as a frozen term of this layer."""
        i = len(self.frozen_scalings)
        self.register_buffer(f"frozen_A_{i}", lora_linear.lora_A.weight.detach().clone())
        self.register_buffer(f"frozen_B_{i}", lora_linear.lora_B.weight.detach().clone())
        self.frozen_scalings.append(lora_linear.scaling)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """nn.Linear holding the dequantised weight plus every frozen adapter, summed in fp32 and rounded once."""
        w = self.dequantized().float()
        for i, scaling in enumerate(self.frozen_scalings):
            w += scaling * (getattr(self, f"frozen_B_{i}").float() @ getattr(self, f"frozen_A_{i}").float())
        with torch.device("meta"):
            dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        dense.weight = nn.Parameter(w.to(self.compute_dtype), requires_grad=False)
        dense.bias = self.bias
        return dense

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, nf4 -> "
                f"{str(self.compute_dtype).removeprefix('torch.')}, frozen adapters={len(self.frozen_scalings)}")


# ----------------------------------------------------------------------------------------------------------------
# Whole models


def is_layer_weight(key: str) -> bool:
    """A weight that --quantize nf4 stores in 4 bits (key without the checkpoint's `model.` prefix)."""
    return _LAYER_WEIGHT.fullmatch(key) is not None


def quantize_weight(key: str, tensor: torch.Tensor):
    """For model.build_from_tensors: a layer weight -> its NF4 bytes (a dict); anything else kept dense.

    On the CPU a checkpoint tensor may be a view of the shard's memory map (safetensors); one kept as it is would
    keep the whole shard mapped, with every page read to quantise the others resident. A copy lets the map go."""
    if is_layer_weight(key):
        return quantize_nf4(tensor, key)
    return tensor.clone() if tensor.device.type == "cpu" else tensor


def install(model, state: dict, dtype: torch.dtype):
    """Swap the (meta) linears whose weights `state` holds as NF4 bytes for NF4Linears, and put those bytes in
    `state` under the new modules' buffer names, so that load_state_dict(strict=True, assign=True) fills them."""
    for key in [k for k, v in state.items() if isinstance(v, dict)]:
        path = key.removesuffix(".weight")
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        old = getattr(parent, name)
        with torch.device("meta"):
            setattr(parent, name, NF4Linear(old.in_features, old.out_features, old.bias is not None, dtype))
        state.update({f"{path}.{k}": v for k, v in state.pop(key).items()})


def _layer_linears(model):
    """(parent module, attribute name, module) of every target linear of every layer."""
    for block in model.layers:
        for target, part in TARGETS.items():
            parent = getattr(block, part)
            yield parent, target, getattr(parent, target)


def quantize_model_(model):
    """Quantise a built model's layer linears in place (bench.py, tests; loading uses build_from_tensors)."""
    for parent, name, module in _layer_linears(model):
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name} is a {type(module).__name__}: quantise the base before adding LoRA")
        setattr(parent, name, NF4Linear.from_linear(module))
    return model


def dequantize_model_(model):
    """Dense nn.Linears back in place of NF4Linears (frozen adapters merged): for a plain checkpoint export."""
    for parent, name, module in _layer_linears(model):
        if isinstance(module, NF4Linear):
            setattr(parent, name, module.to_dense())
        elif not isinstance(module, nn.Linear):
            raise ValueError(f"{name} is a {type(module).__name__}: merge_and_unload the adapters first")
    return model


def warn_if_base_differs(adapter_dir, quantize: str | None, flag: str):
    """Warn when an adapter is put on another base than its run trained it on (NF4 vs dense): allowed (e.g. to
    export onto the original weights), but that model is not the one trained (see the module's docstring)."""
    import json
    import sys
    from pathlib import Path
    config = Path(adapter_dir).resolve().parent / "config.json"
    if not config.is_file():
        return
    trained = json.loads(config.read_text()).get("quantize")
    if trained != quantize:
        print(f"[quant] warning: {flag} {adapter_dir} was trained on a {trained or 'dense'} base and is now put on a "
              f"{quantize or 'dense'} base: this is not the model that was trained (docs/NF4.md)", file=sys.stderr)
