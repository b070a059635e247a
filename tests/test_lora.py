"""lora.py: exact no-op at init, merge algebra, frozen base, per-layer selection, and PEFT as the file oracle."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora import (LoRALinear, apply_lora, disable_lora, drop_lora_input, keep_mask, load_adapter, lora_dropout,
                  lora_modules, lora_parameters, lora_update_norms, merge_and_unload, merge_lora, save_adapter,
                  save_stacked_adapter, set_trainable_layers)
from model import load_model
from weights import CheckpointError

B, T = 2, 10
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(folder, dtype=torch.float32):
    model, _ = load_model(str(folder), dtype=dtype, device="cpu")
    return model


def ids_for(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.args.vocab_size, (B, T), generator=g)


@torch.no_grad()
def randomize(model, seed=1):
    """Non-zero B (and fresh A) so that the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model):
        m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)
        m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def loss_on(model, ids):
    x, _ = model.forward_hidden(ids)
    return model.loss(x, ids)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# The adapted linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_dropout_is_inverted_dropout_with_probability_p(dtype):
    p, n = 0.1, 1_000_000
    x = torch.full((n,), 2.0, dtype=dtype, requires_grad=True)
    y = lora_dropout(x, p, training=True)
    assert y.dtype == dtype
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / n) ** 0.5  # binomial: within 4 sigma
    kept = y[y != 0]
    want = torch.tensor(2.0 / (1 - p)).to(dtype)  # kept values scaled by 1/(1-p), rounded once
    assert torch.equal(kept, torch.full_like(kept, want.item()))
    y.float().sum().backward()
    torch.testing.assert_close(x.grad, (y.detach().float() / 2.0).to(dtype))  # dy/dx = mask / (1-p), by hand
    assert lora_dropout(x, p, training=False) is x and lora_dropout(x, 0.0, training=True) is x


def test_keep_mask_keeps_with_probability_1_minus_p_and_follows_torch_seed():
    p, shape = 0.1, (7, 333, 431)  # an odd element count: the last 64-bit word is half used
    torch.manual_seed(3)
    first, second = keep_mask(shape, p), keep_mask(shape, p)
    n = first.numel()
    assert first.shape == shape and first.dtype == torch.bool
    for mask in (first, second):
        dropped = 1 - mask.float().mean().item()
        assert abs(dropped - p) < 4 * (p * (1 - p) / n) ** 0.5  # binomial: within 4 sigma
    assert not torch.equal(first, second)  # each call draws afresh
    torch.manual_seed(3)
    assert torch.equal(keep_mask(shape, p), first)  # torch's seed (and a checkpoint's RNG state) fixes the masks
    torch.manual_seed(4)
    assert not torch.equal(keep_mask(shape, p), first)
    assert keep_mask(shape, 0.0).all()  # threshold 0: every word is kept


def test_drop_lora_input_zeroes_elements_and_leaves_the_factor_to_the_caller():
    p = 0.25
    x = (torch.rand(4000, dtype=torch.float64) + 1).to(torch.bfloat16).requires_grad_()  # no zeros in x
    y, factor = drop_lora_input(x, p, training=True)
    assert factor == 1 / (1 - p) and y.dtype == x.dtype
    kept = y != 0
    assert torch.equal(y[kept], x.detach()[kept])  # kept elements untouched: exact in bf16
    y.float().sum().backward()
    assert torch.equal(x.grad, kept.to(x.dtype))  # dy/dx = the mask, by hand
    for training, prob in ((False, p), (True, 0.0)):  # no dropout: x itself, factor 1
        same, one = drop_lora_input(x, prob, training)
        assert same is x and one == 1.0


def test_lora_forward_with_dropout_is_the_hand_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    lora = LoRALinear(base, rank=4, alpha=8, dropout=0.3).train()
    torch.nn.init.normal_(lora.lora_B.weight)
    x = torch.randn(5, 16)
    torch.manual_seed(1)
    dropped = lora_dropout(x, 0.3, training=True)  # the same draw the module makes after the same seed
    torch.manual_seed(1)
    got = lora(x)
    want = x @ base.weight.T + base.bias + (8 / 4) * dropped @ lora.lora_A.weight.T @ lora.lora_B.weight.T
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: base biases on q/k/v must stay in place
def test_zero_b_gives_exactly_the_base_logits(kind, tiny_checkpoint):
    folder, _ = tiny_checkpoint(kind)
    model = load(folder)
    ids = ids_for(model)
    with torch.no_grad():
        base = model(ids)
        q = model.layers[0].self_attn.q_proj
        keys_before = set(model.state_dict())
        apply_lora(model).eval()
        assert torch.equal(model(ids), base)
    lora_q = model.layers[0].self_attn.q_proj
    assert isinstance(lora_q, LoRALinear) and lora_q.weight is q.weight and lora_q.bias is q.bias  # no copy
    keys = set(model.state_dict())
    assert keys_before <= keys  # base keys did not move
    assert "layers.0.self_attn.q_proj.lora_A.weight" in keys and "layers.2.mlp.down_proj.lora_B.weight" in keys
    assert len(keys - keys_before) == 2 * 7 * len(model.layers)
    assert not any(p.requires_grad for k, p in model.named_parameters() if ".lora_" not in k)
    assert all(p.requires_grad for p in lora_parameters(model))


def test_merge_equals_hand_formula_and_unmerged_logits(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    model = apply_lora(load(folder), rank=4, alpha=16).eval()
    randomize(model)
    ids = ids_for(model)
    m = model.layers[1].mlp.up_proj
    expected = m.weight.detach().clone() + (16 / 4) * m.lora_B.weight.detach() @ m.lora_A.weight.detach()
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        torch.testing.assert_close(m.weight.detach(), expected, atol=1e-6, rtol=0)
        merged = model(ids)
        assert (merged - unmerged).abs().max().item() <= 1e-5
        once = snapshot(model)
        merge_lora(model)  # idempotent
        assert all(torch.equal(v, once[k]) for k, v in model.state_dict().items())
        assert torch.equal(model(ids), merged)


def test_update_norms_are_the_merged_weight_changes_per_layer(tiny_checkpoint):
    """Reference: merge the adapters and measure how far each layer's weights moved (fp64 for the difference)."""
    folder, _ = tiny_checkpoint("llama")
    model = apply_lora(load(folder), rank=4, alpha=16).eval()
    randomize(model)
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.lora_B.weight.zero_()  # a layer with one target untouched ...
        for m in (model.layers[2].self_attn, model.layers[2].mlp):  # ... and one never trained at all
            for child in m.children():
                if isinstance(child, LoRALinear):
                    child.lora_B.weight.zero_()
    norms = lora_update_norms(model)
    part_norms = {part: lora_update_norms(model, part) for part in ("self_attn", "mlp")}
    before = {k: v.double() for k, v in snapshot(model).items() if k.endswith(".weight") and "lora_" not in k}
    merge_lora(model)
    after = {k: v.double() for k, v in model.state_dict().items() if k in before}
    moved = [sum(float((after[k] - before[k]).pow(2).sum()) for k in before if k.startswith(f"layers.{l}."))
             ** 0.5 for l in range(len(model.layers))]
    assert norms[2] == 0.0 and norms[0] > 0
    assert norms == pytest.approx(moved, rel=1e-5)  # fp32 weights + fp32 update, rounded once in the merge
    for part in ("self_attn", "mlp"):  # each sub-block's own targets: the same reference on its keys only
        moved_part = [sum(float((after[k] - before[k]).pow(2).sum()) for k in before
                          if k.startswith(f"layers.{l}.{part}.")) ** 0.5 for l in range(len(model.layers))]
        assert part_norms[part] == pytest.approx(moved_part, rel=1e-5)
    with pytest.raises(ValueError, match="part must be one of"):
        lora_update_norms(model, "attention")


def test_lora_dtype_fp32_over_bf16_base(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    model = apply_lora(load(folder, torch.bfloat16), lora_dtype=torch.float32)
    m = model.layers[0].self_attn.v_proj
    assert m.weight.dtype == torch.bfloat16 and m.lora_A.weight.dtype == m.lora_B.weight.dtype == torch.float32
    randomize(model)
    ids = ids_for(model)
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    loss_on(model, ids).backward()
    assert m.lora_B.weight.grad.dtype == torch.float32 and m.weight.grad is None


# ----------------------------------------------------------------------------------------------------------------
# Training and layer selection


def test_training_changes_only_lora(tiny_checkpoint):
    folder, _ = tiny_checkpoint("gemma2")
    model = apply_lora(load(folder), dropout=0.1).train()
    before = snapshot(model)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    ids = ids_for(model)
    for _ in range(3):
        opt.zero_grad()
        loss_on(model, ids).backward()
        opt.step()
    after = model.state_dict()
    for k, v in after.items():
        if ".lora_" in k:
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k


def test_set_trainable_layers_steps_only_the_chosen_layers(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    model = apply_lora(load(folder)).eval()
    randomize(model)  # non-zero B, so A gets a gradient on the first step too
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    ids = ids_for(model)
    before = snapshot(model)
    set_trainable_layers(model, [1])
    loss_on(model, ids).backward()
    opt.step()
    for k, v in model.state_dict().items():
        changed = not torch.equal(v, before[k])
        assert changed == (k.startswith("layers.1.") and ".lora_" in k), k
    assert len(lora_parameters(model, [1])) == 14 and all(p.requires_grad for p in lora_parameters(model, [1]))
    assert not any(p.requires_grad for p in lora_parameters(model, [0, 2]))
    set_trainable_layers(model, None)
    assert all(p.requires_grad for p in lora_parameters(model))


@pytest.mark.parametrize("targets", [ALL, ["down_proj", "v_proj", "up_proj"]])
def test_set_trainable_layers_attention_rule_keeps_every_mlp_lora_on(tiny_checkpoint, targets):
    """freeze="attention": the chosen layers' LoRA, plus the MLP LoRA (gate, up, down) of every layer; read from
    the parameter names, and with targets given out of order (the index holds them in canonical order)."""
    folder, _ = tiny_checkpoint("llama")
    model = apply_lora(load(folder), targets=targets)
    set_trainable_layers(model, [1], freeze="attention")
    on = {n for n, p in model.named_parameters() if p.requires_grad}
    want = {n for n, _ in model.named_parameters() if ".lora_" in n and (n.startswith("layers.1.") or ".mlp." in n)}
    assert on == want and any(".mlp." in n and not n.startswith("layers.1.") for n in on)
    set_trainable_layers(model, [1], freeze="layers")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in want if n.startswith("layers.1.")}
    with pytest.raises(ValueError, match="unknown freeze rule 'mlp'; choose one of layers, attention"):
        set_trainable_layers(model, [1], freeze="mlp")


def test_apply_to_some_layers_and_targets(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    model = apply_lora(load(folder), targets=["q_proj", "down_proj"], layers=[2])
    assert isinstance(model.layers[2].mlp.down_proj, LoRALinear)
    assert not isinstance(model.layers[2].mlp.up_proj, LoRALinear)
    assert not isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
    assert len(lora_parameters(model)) == 4
    with pytest.raises(ValueError, match=r"layers \[0\] have no LoRA adapters; adapted layers: \[2\]"):
        set_trainable_layers(model, [0])


def test_disable_lora_gives_base_logits_and_restores(tiny_checkpoint):
    folder, _ = tiny_checkpoint("mistral")
    model = load(folder)
    ids = ids_for(model)
    with torch.no_grad():
        base = model(ids)
        apply_lora(model).eval()
        randomize(model)
        adapted = model(ids)
        assert not torch.allclose(adapted, base)
        with disable_lora(model):
            assert torch.equal(model(ids), base)
        assert torch.equal(model(ids), adapted)
        with pytest.raises(RuntimeError, match="boom"), disable_lora(model):
            raise RuntimeError("boom")
        assert torch.equal(model(ids), adapted)


def test_merge_and_unload_then_fresh_lora(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen2")
    model = apply_lora(load(folder)).eval()
    randomize(model)
    ids = ids_for(model)
    with torch.no_grad():
        adapted = model(ids)
        keys = {k for k in model.state_dict() if ".lora_" not in k}
        merge_and_unload(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert set(model.state_dict()) == keys
        assert (model(ids) - adapted).abs().max().item() <= 1e-5
        apply_lora(model, rank=2).eval()  # the attack stage: a fresh adapter over the merged weights
        assert (model(ids) - adapted).abs().max().item() <= 1e-5
    assert all(p.requires_grad for p in lora_parameters(model))
    assert not any(p.requires_grad for k, p in model.named_parameters() if ".lora_" not in k)


# ----------------------------------------------------------------------------------------------------------------
# PEFT's file format, with PEFT itself as the oracle


@pytest.mark.parametrize("kind,targets,layers", [("llama", ALL, None), ("qwen2", ALL, None),
                                                 ("gemma2", ["q_proj", "v_proj", "down_proj"], [0, 2])])
def test_saved_adapter_loads_in_peft(kind, targets, layers, tiny_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    folder, hf = tiny_checkpoint(kind)
    model = apply_lora(load(folder), targets=targets, layers=layers).eval()
    randomize(model)
    ids = ids_for(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(folder))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                      "adapter_model.safetensors"]
    with torch.no_grad():
        ours = model(ids)
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(ids).logits
        with disable_lora(model):
            assert not torch.allclose(model(ids), ours, atol=1e-3)  # the adapter matters
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_peft_adapter_loads_in_ours(kind, tiny_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    folder, hf = tiny_checkpoint(kind)
    targets = ["up_proj", "q_proj", "k_proj", "o_proj"]
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=4, target_modules=targets,
                                                     task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "peft")
    model = load_adapter(load(folder), tmp_path / "peft").eval()
    assert model.lora_config["target_modules"] == ["q_proj", "k_proj", "o_proj", "up_proj"]  # canonical order
    assert model.lora_config["r"] == 8
    ids = ids_for(model)
    with torch.no_grad():
        diff = (model(ids) - theirs.eval()(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_save_then_load_roundtrip(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("llama")
    a = apply_lora(load(folder), rank=4, alpha=8, layers=[1]).eval()
    randomize(a)
    save_adapter(a, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["layers_to_transform"] == [1]
    b = load_adapter(load(folder), tmp_path / "ad").eval()
    assert all(torch.equal(p, q) for p, q in zip(lora_parameters(a), lora_parameters(b)))


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_apply_errors(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    model = load(folder)
    with pytest.raises(ValueError, match=r"unknown LoRA targets \['lm_head'\]; valid targets: q_proj, k_proj"):
        apply_lora(model, targets=["q_proj", "lm_head"])
    for kw, msg in [(dict(rank=0), "rank must be an integer >= 1"), (dict(rank=2.5), "rank must be"),
                    (dict(alpha=0), "alpha must be > 0"), (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
                    (dict(dropout=-0.1), "dropout must be"), (dict(layers=[3]), r"layer indices \[3\] are out")]:
        with pytest.raises(ValueError, match=msg):
            apply_lora(model, **kw)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # failed calls changed nothing
    with pytest.raises(ValueError, match="has no LoRA adapters; call apply_lora"):
        lora_parameters(model)
    apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA adapters; call merge_and_unload"):
        apply_lora(model)
    merge_lora(model)
    with pytest.raises(ValueError, match="merged into the base weights"):
        with disable_lora(model):
            pass


def test_load_adapter_file_errors(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("llama")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="adapter_config.json is missing"):
        load_adapter(load(folder), empty)
    save_adapter(apply_lora(load(folder)), tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is missing"):
        load_adapter(load(folder), tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    model = load(folder)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: the file is truncated or corrupt"):
        load_adapter(model, tmp_path / "ad")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # read before the model was touched
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_dora": True}))
    with pytest.raises(CheckpointError, match="unsupported LoRA settings {'use_dora': True}"):
        load_adapter(load(folder), tmp_path / "ad")
    cfg_path.write_text("{")
    with pytest.raises(CheckpointError, match="cannot read .*adapter_config.json"):
        load_adapter(load(folder), tmp_path / "ad")


def test_load_adapter_layout_errors(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("llama")
    save_adapter(apply_lora(load(folder), rank=8), tmp_path / "ad")
    with pytest.raises(CheckpointError, match="adapter has rank 8, alpha 4 but the model's LoRA has rank 4"):
        load_adapter(apply_lora(load(folder), rank=4), tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(path)
    gone = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    del tensors[gone]
    tensors["base_model.model.model.layers.9.mlp.up_proj.lora_A.weight"] = torch.zeros(8, 64)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(5, 8)
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as e:
        load_adapter(load(folder), tmp_path / "ad")
    msg = str(e.value)
    assert "does not match the model's LoRA layout" in msg and f"missing (1): {gone}" in msg
    assert "unexpected (1): base_model.model.model.layers.9.mlp.up_proj.lora_A.weight" in msg
    assert "layers.0.self_attn.q_proj.lora_B.weight: adapter (5, 8) vs model (64, 8)" in msg


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_stacked_adapter_is_the_chain_of_two_and_loads_in_peft(kind, tiny_checkpoint, tmp_path):
    """An adapter trained over a merged first one, saved stacked, reproduces base + first + second (PEFT as the
    oracle for the stacked file; our merge of the first, then the second on top, as the chain)."""
    peft = pytest.importorskip("peft")
    folder, hf = tiny_checkpoint(kind)
    first = apply_lora(load(folder), rank=4, alpha=8).eval()
    randomize(first, seed=1)
    save_adapter(first, tmp_path / "first")
    chain = merge_and_unload(load_adapter(load(folder), tmp_path / "first"))
    apply_lora(chain, rank=8, alpha=4).eval()  # a fresh LoRA over the merged weights, as tvaccine.py --init-adapter
    randomize(chain, seed=2)
    save_stacked_adapter(chain, tmp_path / "first", tmp_path / "stacked")
    cfg = json.loads((tmp_path / "stacked" / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12
    ids = ids_for(chain)
    with torch.no_grad():
        want = chain(ids)
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "stacked").eval()(ids).logits
        ours = load_adapter(load(folder), tmp_path / "stacked").eval()(ids)
        with disable_lora(chain):
            assert not torch.allclose(chain(ids), want, atol=1e-3)  # the second adapter matters
    # fp32 throughout; the stacked and chained sums round differently, by ~1e-6 of logits of size ~1
    assert (theirs - want).abs().max().item() <= 1e-4
    assert (ours - want).abs().max().item() <= 1e-4


def test_stacking_refuses_adapters_on_other_modules(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("llama")
    first = apply_lora(load(folder), targets=["q_proj", "v_proj"])
    save_adapter(first, tmp_path / "first")
    model = apply_lora(load(folder))
    with pytest.raises(CheckpointError, match="cannot stack"):
        save_stacked_adapter(model, tmp_path / "first", tmp_path / "stacked")
