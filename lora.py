"""LoRA adapters for model.py's Transformer, without forking its modules.

- `LoRALinear` keeps the base `weight`/`bias` as its own attributes (the same Parameters, never copied), so
  checkpoint keys do not move: `layers.0.self_attn.q_proj.weight` next to `...q_proj.lora_A.weight`.
- `apply_lora` swaps the target linears of every (or chosen) layer and freezes the whole base model;
  the LoRA factors may live in a wider dtype than the base (`lora_dtype=torch.float32` over a bf16 model).
- `set_trainable_layers` turns gradients on for the LoRA factors of exactly the chosen layers (or, with
  freeze="attention", for the MLP LoRA of every layer too), from a precomputed per-layer index: T-Vaccine
  resamples its layers every step, so this must be cheap.
- `merge_lora` folds `alpha/r * B @ A` into the base weights (idempotent); `merge_and_unload` also puts plain
  `nn.Linear`s back, so a fresh adapter can be stacked on the merged model (the attack stage).
- An NF4 base (quant.NF4Linear, `--quantize nf4`) is wrapped the same way, but never merged into: that would
  re-quantise it. `merge_and_unload` keeps each adapter as a frozen term of its NF4Linear instead (quant.py).
- `disable_lora`: a context manager that gives the base model's outputs.
- `save_adapter` / `load_adapter` speak PEFT's format (adapter_config.json + adapter_model.safetensors with
  `base_model.model.model.layers...` keys), loading strictly: every tensor used, every factor filled.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from weights import CheckpointError, iter_tensors

# Which sub-module of a layer holds each target: these names are both HF's and PEFT's `target_modules`.
TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
PEFT_PREFIX = "base_model.model.model."  # PeftModel -> LoraModel -> *ForCausalLM -> decoder (our Transformer)
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"

# ----------------------------------------------------------------------------------------------------------------
# The adapted linear


def keep_mask(shape, p: float) -> torch.Tensor:
    """A boolean mask, each element True (kept) with probability 1 - p, for LoRA dropout on the CPU.

    torch's CPU RNG (mt19937, one fp32 per element) made LoRA dropout a tenth of a CPU step: 7 inputs per layer
    and pass. Here each element is one 32-bit word of numpy's SFC64 (two per 64-bit output, about 6x cheaper),
    kept when it is >= round(p * 2**32), so P(drop) = p within 2**-33 (fp32 uniforms: 2**-24). The generator
    is seeded from torch's, so torch.manual_seed and the RNG state a checkpoint saves still fix every mask."""
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    words = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
    return torch.from_numpy(words >= round(p * 2**32)).view(shape)


def drop_lora_input(x, p: float, training: bool) -> tuple[torch.Tensor, float]:
    """LoRA dropout on the input x, as (dropped x, factor): inverted dropout is dropped x * factor.

    On the CPU the factor 1/(1-p) is left to the caller, who applies it to the rank-r tensor (r << features):
    x * mask is then exact in any dtype and one full-size product per input and pass is spared. GPU (and meta,
    which stands for it in bench.py) keep F.dropout's fused kernel, scaling included."""
    if not training or p == 0:
        return x, 1.0
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True), 1.0
    return x * keep_mask(x.shape, p).to(x.dtype), 1 / (1 - p)  # bool * bf16 has no fast kernel: cast first


def lora_dropout(x, p: float, training: bool):
    """Inverted dropout as nn.Dropout (kept elements times 1/(1-p), rounded once to x's dtype), with the same
    draw LoRALinear makes after the same seed."""
    dropped, factor = drop_lora_input(x, p, training)
    return dropped if factor == 1.0 else (dropped.float() * factor).to(x.dtype)


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / r) * B(A(dropout(x))), with W and b frozen and B zero at the start."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, lora_dtype=None,
                 math_in_input_dtype: bool = False):
        super().__init__()
        # A plain base lends its Parameters (no copy, same keys); a quantised one (quant.NF4Linear) is kept whole:
        # it computes x W^T + b itself.
        self.base = None if isinstance(base, nn.Linear) else base
        self.weight, self.bias = (base.weight, base.bias) if self.base is None else (None, None)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        like = base.weight if self.base is None else base  # a tensor, or NF4Linear's device / dtype properties
        kw = dict(bias=False, device=like.device, dtype=lora_dtype or like.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT, so B A starts at exactly zero
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = dropout  # probability, on the LoRA input only
        # False: the input is cast to the factors' dtype and the LoRA path runs there (PEFT's way: fp32 math over a
        # bf16 model). True: the fp32 factors are cast to the input's dtype instead (autocast's way: bf16 math,
        # fp32 master weights and gradients), which spares two (tokens x features) casts per module and pass.
        self.math_in_input_dtype = math_in_input_dtype
        self.merged = False    # B A already folded into weight: the LoRA path must not be added again
        self.disabled = False  # base model only (disable_lora)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias) if self.base is None else self.base(x)
        if self.merged or self.disabled:
            return y
        a, keep_factor = drop_lora_input(x, self.dropout, self.training)
        scale = self.scaling * keep_factor  # applied to the rank-r tensor: r << in, out
        if self.math_in_input_dtype:
            A, B = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
            return y + F.linear(F.linear(a, A) * scale, B)
        a = a.to(self.lora_A.weight.dtype)  # fp32 factors: fp32 math
        return y + self.lora_B(self.lora_A(a) * scale).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        if self.base is not None:
            raise ValueError("the base weights are NF4: merging the adapter into them would re-quantise them; "
                             "merge_and_unload keeps it as a frozen term of the NF4 layer instead")
        delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))  # one rounding, not two
        self.merged = True

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}, "
                f"bias={(self.base or self).bias is not None}, merged={self.merged}")


# ----------------------------------------------------------------------------------------------------------------
# Applying, selecting, merging


def apply_lora(model, rank: int = 8, alpha: float = 4, dropout: float = 0.1,
               targets: Iterable[str] = tuple(TARGETS), layers: Iterable[int] | None = None, lora_dtype=None,
               math_in_input_dtype: bool = False):
    """Swap the target linears of `layers` (None = all) for LoRALinear; freeze every base parameter.
    math_in_input_dtype: run the LoRA path in the activations' dtype (see LoRALinear)."""
    targets = list(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        what = f"unknown LoRA targets {unknown}" if unknown else "no LoRA targets given"
        raise ValueError(f"{what}; valid targets: {', '.join(TARGETS)}")
    targets = [t for t in TARGETS if t in targets]  # canonical order, no duplicates (PEFT saves a set)
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; call merge_and_unload(model) before adding new ones")
    layers = _check_layers(model, layers)
    for p in model.parameters():
        p.requires_grad_(False)
    for l in layers:
        for t in targets:
            parent = getattr(model.layers[l], TARGETS[t])
            lora = LoRALinear(getattr(parent, t), rank, alpha, dropout, lora_dtype, math_in_input_dtype)
            setattr(parent, t, lora)  # the Parameters made by the LoRALinear are trainable; the base is not
    model.lora_config = dict(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             layers=None if len(layers) == len(model.layers) else layers)
    model._lora_index = {l: [getattr(getattr(model.layers[l], TARGETS[t]), t) for t in targets] for l in layers}
    return model


def _check_layers(model, layers) -> list[int]:
    n = len(model.layers)
    if layers is None:
        return list(range(n))
    layers = sorted(set(int(l) for l in layers))
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise ValueError(f"layer indices {bad} are out of range: the model has {n} layers (0..{n - 1})")
    return layers


def _index(model) -> dict[int, list[LoRALinear]]:
    index = getattr(model, "_lora_index", None)
    if not index:
        raise ValueError("the model has no LoRA adapters; call apply_lora(model) first")
    return index


def lora_modules(model) -> list[LoRALinear]:
    return [m for mods in _index(model).values() for m in mods]


def _selected(model, layers) -> list[int]:
    index = _index(model)
    if layers is None:
        return list(index)
    layers = sorted(set(int(l) for l in layers))
    bad = [l for l in layers if l not in index]
    if bad:
        raise ValueError(f"layers {bad} have no LoRA adapters; adapted layers: {list(index)}")
    return layers


def lora_parameters(model, layers: Iterable[int] | None = None) -> list[nn.Parameter]:
    """The LoRA factors (A then B of each adapted linear) of `layers`, or of all adapted layers."""
    index = _index(model)
    return [p for l in _selected(model, layers) for m in index[l] for p in (m.lora_A.weight, m.lora_B.weight)]


FREEZE_RULES = ("layers", "attention")


def set_trainable_layers(model, layers: Iterable[int] | None, freeze: str = "layers"):
    """requires_grad on the LoRA factors of `layers` (None = all layers), and what else `freeze` leaves on.

    freeze="layers" (the paper): the other layers' LoRA is frozen, attention and MLP alike.
    freeze="attention" (the authors' public code): only the other layers' attention LoRA (q, k, v, o) is frozen;
    the MLP LoRA (gate, up, down) of every layer stays trainable."""
    if freeze not in FREEZE_RULES:
        raise ValueError(f"unknown freeze rule {freeze!r}; choose one of {', '.join(FREEZE_RULES)}")
    chosen = set(_selected(model, layers))
    targets = model.lora_config["target_modules"]  # the order of each layer's modules in the index
    for l, mods in _index(model).items():
        for t, m in zip(targets, mods):
            on = l in chosen or (freeze == "attention" and TARGETS[t] == "mlp")
            m.lora_A.weight.requires_grad_(on)
            m.lora_B.weight.requires_grad_(on)


@torch.no_grad()
def lora_update_norms(model, part: str | None = None) -> list[float]:
    """Per adapted layer, how far training moved it: sqrt(sum over its targets of ||(alpha/r) B A||_F^2).

    The weight update itself, not the factors (B A is invariant to rescaling A up and B down). Layers that
    T-Vaccine never sampled keep B = 0 and read exactly 0. part ("self_attn" or "mlp"): that sub-block's
    targets only (the authors' freezing rule trains the two differently)."""
    if part not in (None, *TARGETS.values()):
        raise ValueError(f"part must be one of {sorted(set(TARGETS.values()))} or None, got {part!r}")
    norms = []
    for l, mods in sorted(_index(model).items()):
        if part is not None:
            inside = {id(m) for m in getattr(model.layers[l], part).modules()}
            mods = [m for m in mods if id(m) in inside]
        sq = sum(float((m.scaling * m.lora_B.weight.float() @ m.lora_A.weight.float()).pow(2).sum()) for m in mods)
        norms.append(sq ** 0.5)
    return norms


def merge_lora(model):
    """Fold every adapter into its base weight in place; a second call changes nothing."""
    for m in lora_modules(model):
        m.merge()
    return model


def merge_and_unload(model):
    """Merge, then put plain nn.Linears (holding the merged Parameters) back: the model has no LoRA left.
    NF4 base layers come back as themselves, each holding its adapter as a frozen term (quant.py): exact."""
    for m in lora_modules(model):
        if m.base is None:
            m.merge()
    for l, mods in _index(model).items():
        for part in ("self_attn", "mlp"):
            parent = getattr(model.layers[l], part)
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear) and child.base is not None:
                    child.base.freeze_adapter(child)
                    setattr(parent, name, child.base)
                elif isinstance(child, LoRALinear):
                    with torch.device("meta"):  # the Parameters below replace these at once: allocate nothing
                        plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                    plain.weight, plain.bias = child.weight, child.bias
                    setattr(parent, name, plain)
    del model._lora_index, model.lora_config
    return model


@contextmanager
def disable_lora(model):
    """Inside: the base model's outputs. The previous state comes back even if the body raises."""
    mods = lora_modules(model)
    if any(m.merged for m in mods):
        raise ValueError("the adapters are merged into the base weights: disable_lora cannot remove them")
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(mods, before):
            m.disabled = d


# ----------------------------------------------------------------------------------------------------------------
# PEFT-format files


def _atomic_write(path: Path, write):
    # A crash mid-write must not leave a half file under the final name: write beside it, then rename.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _lora_tensors(model) -> dict[str, torch.Tensor]:
    """The model's LoRA A and B weights by state-dict key, detached, on the CPU."""
    _index(model)  # raises if there is nothing to save
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def _config_layers(cfg: dict) -> list[int] | None:
    """PEFT's layers_to_transform as a list (it may be one int), None for every layer."""
    layers = cfg.get("layers_to_transform")
    return [layers] if isinstance(layers, int) else layers


def save_adapter(model, out_dir, base_model_name_or_path: str = "") -> Path:
    """Write the adapter as PEFT does; `PeftModel.from_pretrained(hf_model, out_dir)` loads it."""
    tensors = _lora_tensors(model)
    cfg = model.lora_config
    return _write_adapter(out_dir, tensors, cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["target_modules"],
                          cfg["layers"], base_model_name_or_path)


def save_stacked_adapter(model, first_dir, out_dir, base_model_name_or_path: str = "") -> Path:
    """Write the adapter of `first_dir` followed by the model's own as ONE adapter of the original base model.

    For a run that merged `first_dir` into the base weights before training its own LoRA (tvaccine.py
    --init-adapter, e.g. TAR on top of SFT): the model it trained is W + s1 B1 A1 + s2 B2 A2 (s = alpha / r)
    = W + [s1 B1 | s2 B2] [A1 ; A2], a LoRA of rank r1 + r2 with alpha = r1 + r2 (scale 1). Exact, and PEFT,
    attack.py and evaluate.py load it like any other adapter."""
    own = {k: v.float() for k, v in _lora_tensors(model).items()}
    first = Path(first_dir)
    cfg1, cfg2 = _read_config(first / CONFIG_FILE), model.lora_config
    layers1 = _config_layers(cfg1)
    if set(cfg1["target_modules"]) != set(cfg2["target_modules"]) or layers1 != cfg2["layers"]:
        raise CheckpointError(f"{first}: its adapter covers {cfg1['target_modules']} on layers {layers1 or 'all'}, "
                              f"the model's {cfg2['target_modules']} on {cfg2['layers'] or 'all'}: cannot stack them")
    earlier = {k.removeprefix(PEFT_PREFIX): v.float() for k, v in iter_tensors([first / WEIGHTS_FILE])}
    if set(earlier) != set(own):
        raise CheckpointError(f"{first / WEIGHTS_FILE} does not hold the same LoRA modules as the model")
    s1, s2 = cfg1["lora_alpha"] / cfg1["r"], cfg2["lora_alpha"] / cfg2["r"]
    stacked = {k: torch.cat([earlier[k], v]) if ".lora_A." in k else torch.cat([s1 * earlier[k], s2 * v], dim=1)
               for k, v in own.items()}
    rank = cfg1["r"] + cfg2["r"]
    return _write_adapter(out_dir, stacked, rank, rank, cfg2["lora_dropout"], cfg2["target_modules"], cfg2["layers"],
                          base_model_name_or_path)


def _write_adapter(out_dir, tensors: dict, r: int, alpha: float, dropout: float, targets: list, layers,
                   base_model_name_or_path: str) -> Path:
    """adapter_model.safetensors (PEFT's key names) + adapter_config.json, each written atomically."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in tensors.items()}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "lora_dropout": dropout, "target_modules": targets, "bias": "none",
        "fan_in_fan_out": False, "base_model_name_or_path": base_model_name_or_path or None,
        "inference_mode": True, "init_lora_weights": True, "layers_to_transform": layers,
        "layers_pattern": "layers" if layers is not None else None, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
    }
    _atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return out


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(cfg, dict) or "r" not in cfg or "lora_alpha" not in cfg:
        raise CheckpointError(f"{path}: not a LoRA adapter config (no r / lora_alpha)")
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    # Variants that change the math (other scaling, magnitude vectors, trained biases): refuse, don't guess.
    unsupported = {k: cfg[k] for k in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "rank_pattern",
                                       "alpha_pattern", "modules_to_save") if cfg.get(k)}
    if cfg.get("bias", "none") != "none":
        unsupported["bias"] = cfg["bias"]
    if not isinstance(cfg.get("target_modules"), list):
        unsupported["target_modules"] = cfg.get("target_modules")
    if unsupported:
        raise CheckpointError(f"{path}: unsupported LoRA settings {unsupported}")
    return cfg


def load_adapter(model, adapter_dir, lora_dtype=None):
    """Load a PEFT LoRA adapter; adds the adapters first if the model has none. Strict about every key."""
    folder = Path(adapter_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing: an adapter folder needs {CONFIG_FILE} and "
                                  f"{WEIGHTS_FILE} (as written by save_adapter or PEFT's save_pretrained)")
    cfg = _read_config(folder / CONFIG_FILE)
    tensors = dict(iter_tensors([folder / WEIGHTS_FILE]))  # read (a corrupt file raises) before touching the model
    if getattr(model, "_lora_index", None) is None:
        apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), cfg["target_modules"],
                   _config_layers(cfg), lora_dtype)
    have = model.lora_config
    if (have["r"], have["lora_alpha"]) != (cfg["r"], cfg["lora_alpha"]):
        raise CheckpointError(f"{folder}: the adapter has rank {cfg['r']}, alpha {cfg['lora_alpha']} but the "
                              f"model's LoRA has rank {have['r']}, alpha {have['lora_alpha']}")
    own = {k: p for k, p in model.named_parameters() if ".lora_A." in k or ".lora_B." in k}
    filled, unexpected, wrong_shape = set(), [], []
    with torch.no_grad():
        for name, tensor in tensors.items():
            key = name.removeprefix(PEFT_PREFIX)
            if key == name or key not in own:
                unexpected.append(name)
            elif tensor.shape != own[key].shape:
                wrong_shape.append(f"{name}: adapter {tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
                filled.add(key)  # present, just wrong: listed once, under wrong shape
            else:
                own[key].copy_(tensor)
                filled.add(key)
    missing = sorted(PEFT_PREFIX + k for k in set(own) - filled)
    if missing or unexpected or wrong_shape:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not match the model's LoRA layout:"
                              + _listing("missing", missing) + _listing("unexpected", unexpected)
                              + _listing("wrong shape", wrong_shape))
    return model


def _listing(what, names, limit=10):
    if not names:
        return ""
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"\n  {what} ({len(names)}): {', '.join(names[:limit])}{more}"
