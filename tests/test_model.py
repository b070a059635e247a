"""model.py against HF transformers on tiny random configs: logits, hooks, loss, errors (generation:
test_generate.py)."""
import json

import pytest
import torch

from conftest import ARCHS, tiny_hf_model
from model import ModelArgs, Transformer, build_from_tensors, load_model
from weights import CheckpointError

B, T = 3, 12


def batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    right = torch.ones(B, T, dtype=torch.long)
    right[1, 9:] = 0
    right[2, 5:] = 0
    left = torch.ones(B, T, dtype=torch.long)
    left[1, :3] = 0
    left[2, :7] = 0
    return ids, right, left


def hf_logits(hf, ids, mask):
    if mask is None:
        return hf(ids).logits
    # HF's generate computes these positions for left padding; our model derives them from the mask
    return hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


@pytest.mark.parametrize("kind", ARCHS)
def test_logits_match_transformers_fp32(kind, tiny_checkpoint):
    folder, hf = tiny_checkpoint(kind)
    ours, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
    ids, right, left = batch(hf.config.vocab_size)
    with torch.no_grad():
        for mask in (None, right, left):
            valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            diff = (hf_logits(hf, ids, mask) - ours(ids, mask))[valid].abs().max().item()
            print(f"{kind} fp32 mask={'none' if mask is None else 'padded'} max|diff|={diff:.2e}")
            assert diff <= 1e-4


@pytest.mark.parametrize("kind", ARCHS)
def test_logits_match_transformers_bf16(kind, tiny_checkpoint):
    folder, hf = tiny_checkpoint(kind)
    hf = hf.to(torch.bfloat16)
    ours, _ = load_model(str(folder), dtype=torch.bfloat16, device="cpu")
    ids, right, _ = batch(hf.config.vocab_size)
    with torch.no_grad():
        ref, got = hf_logits(hf, ids, right).float(), ours(ids, right).float()
    valid = right.bool()
    diff = (ref - got)[valid].abs().max().item()
    scale = ref[valid].abs().max().item()
    print(f"{kind} bf16 max|diff|={diff:.2e} (logit scale {scale:.2f})")
    assert diff <= 0.05 * max(scale, 1.0)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])  # gemma2: sliding-window masks on the unpadded path
def test_padded_batch_sends_only_real_tokens_through_the_layers(kind, tiny_checkpoint):
    """Pads skip every token-wise op (the MLP sees N real rows, not B*T), and each real position equals
    the same row run alone without any padding; exposed h_l keep the (B, T, dim) layout."""
    folder, _ = tiny_checkpoint(kind)
    ours, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
    ids, right, left = batch(ours.args.vocab_size)
    seen = []
    ours.layers[1].mlp.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    with torch.no_grad():
        for mask in (right, left):
            seen.clear()
            x, h = ours.forward_hidden(ids, mask, expose=[1])
            assert seen == [(int(mask.sum()), ours.args.dim)] and h[1].shape == (B, T, ours.args.dim)
            for row in range(B):
                real = mask[row].bool()
                alone, _ = ours.forward_hidden(ids[row, real][None])  # no mask, no padding: the plain path
                torch.testing.assert_close(x[row, real], alone[0], atol=1e-5, rtol=1e-5)


def test_from_hf_rejects_unknown_model_type():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported: llama, mistral"):
        ModelArgs.from_hf({"model_type": "gpt2"})


def test_config_mapping_of_quirks():
    args = ModelArgs.from_hf(tiny_hf_model("gemma2").config.to_dict())
    assert args.sliding_layers == (0, 2) and args.sliding_window == 5 and args.sandwich_norm
    assert args.attn_scale == pytest.approx(20 ** -0.5) and args.attn_softcap == 0.05 and args.final_softcap == 0.5
    assert args.head_dim == 24 and args.n_kv_heads == 2 and args.tie_embeddings and args.act == "gelu_tanh"
    q = ModelArgs.from_hf(tiny_hf_model("qwen2").config.to_dict())
    assert q.qkv_bias and not q.o_bias and q.rope_theta == 1e6 and q.tie_embeddings


def test_llama3_rope_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from model import rope_inv_freq
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=512,
                                   rope_parameters=scaling)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(ModelArgs.from_hf(cfg.to_dict()))
    torch.testing.assert_close(ours, ref)


# --- the alignment hook point -------------------------------------------------------------------------------------

def _hf_attention_outputs(hf, ids, mask, eps=None):
    """Reference h_l via forward hooks on HF's attention modules (hooks are fine in a test oracle)."""
    outs, handles = {}, []
    for l, layer in enumerate(hf.model.layers):
        def hook(mod, inp, out, l=l):
            h = out[0]
            if eps is not None and l in eps:
                h = h + eps[l]
            outs[l] = h
            return (h,) + tuple(out[1:])
        handles.append(layer.self_attn.register_forward_hook(hook))
    logits = hf_logits(hf, ids, mask)
    for h in handles:
        h.remove()
    return logits, outs


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_expose_and_perturb_match_hooked_transformers(kind, tiny_checkpoint):
    folder, hf = tiny_checkpoint(kind)
    ours, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
    ids, right, _ = batch(hf.config.vocab_size)
    eps = {0: torch.randn(B, T, 64) * 0.1, 2: torch.randn(B, T, 64) * 0.1}
    with torch.no_grad():
        ref_logits, ref_h = _hf_attention_outputs(hf, ids, right, eps)
        x, got_h = ours.forward_hidden(ids, right, expose=(0, 1, 2), perturb=eps)
    valid = right.bool()
    for l in range(3):
        assert (ref_h[l] - got_h[l])[valid].abs().max() <= 1e-5
    assert (ref_logits - ours.logits(x))[valid].abs().max() <= 1e-4


def _grads(model, ids, mask, labels, **kw):
    model.zero_grad(set_to_none=True)
    x, exposed = model.forward_hidden(ids, mask, **kw)
    loss = model.loss(x, labels)
    hs = [exposed[l] for l in sorted(exposed)]
    dh = torch.autograd.grad(loss, hs, retain_graph=True) if hs else ()
    loss.backward()
    return loss, dh, {n: p.grad for n, p in model.named_parameters()}


def test_loss_matches_transformers_and_skips_prompt_positions(tiny_checkpoint):
    folder, hf = tiny_checkpoint("llama")
    ours, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
    ids, right, _ = batch(hf.config.vocab_size)
    labels = ids.masked_fill(right == 0, -100)
    labels[:, :4] = -100  # prompt tokens carry no loss
    ref = hf(ids, attention_mask=right, labels=labels).loss
    x, _ = ours.forward_hidden(ids, right)
    assert ours.loss(x, labels).item() == pytest.approx(ref.item(), abs=1e-5)
    with pytest.raises(ValueError, match="no target tokens"):
        ours.loss(x, torch.full_like(labels, -100))


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_grad_from_and_checkpointing_give_the_same_gradients(kind, tiny_checkpoint):
    folder, hf = tiny_checkpoint(kind)
    model, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
    ids, right, _ = batch(hf.config.vocab_size)
    labels = ids.masked_fill(right == 0, -100)
    loss0, dh0, g0 = _grads(model, ids, right, labels, expose=(1, 2))
    model.checkpointing = True
    loss1, dh1, g1 = _grads(model, ids, right, labels, expose=(1, 2), grad_from=1)
    assert loss1.item() == pytest.approx(loss0.item(), abs=1e-6)
    for a, b in zip(dh0, dh1):
        torch.testing.assert_close(a, b)
    tied = model.args.tie_embeddings  # then embed_tokens.weight is lm_head.weight and gets the head's gradient
    for name, g in g1.items():
        if name.startswith("layers.0.") or (name.startswith("embed_tokens") and not tied):
            assert g is None, f"{name} got a gradient below grad_from"
        elif not name.startswith("embed_tokens"):
            torch.testing.assert_close(g, g0[name], rtol=1e-5, atol=1e-6)


def test_expose_without_any_trainable_parameter_still_gives_dl_dh(tiny_checkpoint):
    folder, hf = tiny_checkpoint("llama")
    model, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
    model.requires_grad_(False)
    ids, right, _ = batch(hf.config.vocab_size)
    labels = ids.masked_fill(right == 0, -100)
    x, exposed = model.forward_hidden(ids, right, expose=(0, 1, 2))
    dh = torch.autograd.grad(model.loss(x, labels), [exposed[l] for l in range(3)])
    # oracle: the same with every parameter trainable
    model.requires_grad_(True)
    x, exposed = model.forward_hidden(ids, right, expose=(0, 1, 2))
    ref = torch.autograd.grad(model.loss(x, labels), [exposed[l] for l in range(3)])
    for a, b in zip(dh, ref):
        torch.testing.assert_close(a, b)


# --- loading errors -----------------------------------------------------------------------------------------------

def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(CheckpointError, match="unknown model 'no-such-model'.*smollm2-135m"):
        load_model("no-such-model", device="cpu")


def test_missing_weights_and_mismatched_config(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"(?s)does not match its config.*missing \(9\): model.layers.3."):
        load_model(str(folder), device="cpu")
    cfg["num_hidden_layers"], cfg["hidden_size"] = 2, 32
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"(?s)unexpected \(\d+\): model.layers.2.*wrong shape"):
        load_model(str(folder), device="cpu")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(str(folder), device="cpu")


def test_corrupt_weights_and_bad_config(tiny_checkpoint):
    folder, _ = tiny_checkpoint("qwen2")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(str(folder), device="cpu")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="(?s)config.json is not usable.*'bert' is not supported"):
        load_model(str(folder), device="cpu")


def test_a_plain_file_is_rejected(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_model(str(f), device="cpu")


def test_sliding_window_and_softcaps_are_exercised(tiny_checkpoint):
    """The gemma2 parity above would be vacuous if the window or the caps never bit: show that they do."""
    folder, hf = tiny_checkpoint("gemma2")
    model, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
    ids, _, _ = batch(hf.config.vocab_size)
    with torch.no_grad():
        base = model(ids)
        for field, value in (("sliding_window", 1000), ("attn_softcap", 1e6), ("final_softcap", 1e6)):
            old = getattr(model.args, field)
            setattr(model.args, field, value)
            assert (model(ids) - base).abs().max() > 1e-3, field
            setattr(model.args, field, old)


def test_on_grad_hooks_get_dl_dh_without_keeping_h(tiny_checkpoint):
    """on_grad (the importance pass) receives the same dL/dh_l as autograd.grad on exposed h_l, and the forward
    hands out no h_l for the hooked layers."""
    folder, hf = tiny_checkpoint("llama")
    model, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
    model.requires_grad_(False)  # nothing trainable: h_0 becomes the leaf the backward stops at
    ids, right, _ = batch(hf.config.vocab_size)
    labels = ids.masked_fill(right == 0, -100)
    x, exposed = model.forward_hidden(ids, right, expose=(0, 1, 2))
    ref = torch.autograd.grad(model.loss(x, labels), [exposed[l] for l in range(3)])
    seen = {}
    hooks = {l: (lambda g, l=l: seen.__setitem__(l, g)) for l in (1, 2)}
    x, exposed = model.forward_hidden(ids, right, expose=[0], on_grad=hooks)
    assert set(exposed) == {0}
    (g0,) = torch.autograd.grad(model.loss(x, labels), [exposed[0]])
    torch.testing.assert_close(g0, ref[0])
    for l in (1, 2):
        torch.testing.assert_close(seen[l], ref[l])
