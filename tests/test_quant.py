"""The NF4 base (`--quantize nf4`, quant.py) against independent references: torchao's NF4Tensor for the bytes and
values, a hand-written double quantisation where torchao refuses the shape, the same step on a dense model holding
the dequantised weights, HF transformers + peft for the adapter round trip, and hand-computed byte counts."""
import json
import math
import weakref

import pytest
import torch

import bench
import quant
import trainer
import tvaccine
import weights
from lora import apply_lora, load_adapter, lora_parameters, merge_and_unload, merge_lora, save_adapter
from model import ModelArgs, Transformer, build_from_tensors, load_model
from tvaccine import perturbed_step, sft_step

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def torchao_to_nf4():
    pytest.importorskip("torchao")
    try:  # torchao >= 0.13 moved the module; older releases keep it under dtypes
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        from torchao.dtypes.nf4tensor import to_nf4
    return to_nf4


# --- the bytes -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 256), (96, 1024), (256, 2048), (16384,)])
def test_quantize_and_dequantize_match_torchao_bit_for_bit(dtype, shape):
    to_nf4 = torchao_to_nf4()
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(dtype)
    ref = to_nf4(w)
    q = quant.quantize_nf4(w)
    assert torch.equal(q["packed"], ref.quantized_data)
    assert torch.equal(q["scalers"], ref.quantized_scalers)
    assert torch.equal(q["scaler_factors"], ref.quantization_factor.float())  # torchao keeps w's dtype: exact in fp32
    assert torch.equal(q["scaler_mean"], ref.scaler_mean.float())
    assert torch.equal(quant.dequantize_nf4(q, shape, dtype), ref.get_original_weight())


def test_an_all_zero_block_dequantises_to_zeros():
    # torchao divides such a block by its absmax 0 and codes the NaNs as level -1 (then -1 x its scale); here the
    # block takes the level 0.0, whatever its double-quantised scale, and no other block changes.
    w = torch.randn(256 * 64, dtype=torch.bfloat16) * 0.02
    w[64:128] = 0
    q = quant.quantize_nf4(w)
    assert bool((q["packed"][32:64] == 0x77).all())  # level 7 = 0.0 in both nibbles
    deq = quant.dequantize_nf4(q, w.shape, torch.bfloat16)
    assert bool((deq[64:128] == 0).all()) and bool(deq[:64].ne(0).any())


def reference_double_quantize(absmax: torch.Tensor):
    """QLoRA's double quantisation written plainly, group by group (the last group may be short)."""
    mean = absmax.mean()
    centred = absmax - mean
    codes, factors = [], []
    for start in range(0, len(centred), 256):
        group = centred[start:start + 256]
        factor = 256 / (2 * group.abs().max())
        codes.append((group * factor).round().clamp(-128, 127).to(torch.int8))
        factors.append(factor.float())
    return torch.cat(codes), torch.stack(factors), mean


@pytest.mark.parametrize("n_blocks", [64, 300, 5184])  # 5184: SmolLM2's q_proj (576 x 576)
def test_a_short_last_scaler_group_is_quantised_like_the_others(n_blocks):
    torch.manual_seed(1)
    w = torch.randn(n_blocks * 64, dtype=torch.bfloat16) * 0.02
    q = quant.quantize_nf4(w)
    codes, factors, mean = reference_double_quantize(w.view(-1, 64).abs().amax(1))
    assert torch.equal(q["scalers"], codes) and torch.equal(q["scaler_factors"], factors)
    assert q["scaler_mean"] == mean.float()
    # values: level * (code / factor + mean), rounded to bf16 at each step as torchao does
    levels = torch.tensor(quant.NF4_LEVELS, dtype=torch.bfloat16)
    idx = torch.stack([q["packed"] >> 4, q["packed"] & 15], 1).flatten().long()
    scale = (codes.float() / factors.repeat_interleave(256)[:n_blocks]).to(torch.bfloat16) + mean
    assert torch.equal(quant.dequantize_nf4(q, w.shape, torch.bfloat16),
                       (levels[idx].view(-1, 64) * scale[:, None]).flatten())


def test_nf4_bytes_per_weight():
    layer = quant.NF4Linear(4096, 11008, bias=False, dtype=torch.bfloat16, device="meta")
    n = 4096 * 11008
    by_hand = n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4  # codes, int8 scalers, fp32 factors and mean
    assert sum(b.numel() * b.element_size() for b in layer.buffers()) == by_hand == quant.nf4_nbytes(n)


# --- the model -----------------------------------------------------------------------------------------------------

def make_batch(vocab=96, B=4, T=14, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 10:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def with_lora(model, seed=0):
    torch.manual_seed(seed)
    apply_lora(model, rank=4, alpha=8, dropout=0.1, lora_dtype=torch.float32)
    with torch.no_grad():  # B = 0 at init would leave A without gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.train()


def nf4_and_dense(folder, dtype, checkpointing):
    """The NF4 model and a dense one whose layer weights are the NF4 model's dequantised weights."""
    nf4, _ = load_model(str(folder), dtype=dtype, device="cpu", quantize="nf4", checkpointing=checkpointing)
    dense, _ = load_model(str(folder), dtype=dtype, device="cpu", checkpointing=checkpointing)
    with torch.no_grad():
        for (_, _, q), (_, _, d) in zip(quant._layer_linears(nf4), quant._layer_linears(dense)):
            assert isinstance(q, quant.NF4Linear) and isinstance(d, torch.nn.Linear)
            d.weight.copy_(q.dequantized())
    return nf4, dense


@pytest.mark.parametrize("kind,dtype,checkpointing", [("llama", torch.float32, False), ("llama", torch.bfloat16, True),
                                                      ("qwen2", torch.bfloat16, False)])  # qwen2: biases on q, k, v
def test_sft_and_tvaccine_steps_equal_the_dense_model_holding_the_dequantised_weights(tiny_checkpoint, kind, dtype,
                                                                                      checkpointing):
    folder, _ = tiny_checkpoint(kind, layers=3)
    results = []
    for model in nf4_and_dense(folder, dtype, checkpointing):
        with_lora(model)
        batch = make_batch()
        torch.manual_seed(5)  # the same LoRA dropout masks on both sides
        sft = sft_step(model, batch)
        tv = perturbed_step(model, batch, [1, 2], 1.0)  # T-Vaccine's step, layer 0 below min(S)
        results.append((sft, tv, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (sft_q, tv_q, g_q), (sft_d, tv_d, g_d) = results
    # Exact, not close: each side runs the same aten ops on the same values (the forward F.linear(x, W, b) with
    # W = the dequantised weight; the backward's dL/dx = g @ W is the mm autograd runs for a dense linear, same
    # shapes and strides), and CPU kernels are deterministic for a given op, shape and dtype.
    assert sft_q == sft_d and tv_q == tv_d
    assert set(g_q) == set(g_d) and len(g_q) == 2 * 7 * 3
    for n in g_d:
        assert torch.equal(g_q[n], g_d[n]), n


def test_backward_keeps_no_dense_weight_alive(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama", layers=3, vocab_size=100)  # an LM head (100 x 64) unlike any layer weight
    # q/o, k/v, gate/up, down of the tiny config, as stored or transposed (autograd saves W^T for x @ W^T)
    weight_shapes = {s for shape in [(64, 64), (32, 64), (96, 64), (64, 96)] for s in (shape, shape[::-1])}
    batch = make_batch(B=4, T=13)  # 4 x 13 tokens (49 real): no activation has a weight's shape
    found = {}
    for name, model in zip(("nf4", "dense"), nf4_and_dense(folder, torch.float32, False)):
        with_lora(model)
        saved = []

        def pack(t):
            saved.append(tuple(t.shape))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x, _ = model.forward_hidden(batch["input_ids"], batch["attention_mask"])
            loss = model.loss(x, batch["labels"])
        loss.backward()
        found[name] = sum(s in weight_shapes for s in saved)
    # the check sees the weights where autograd keeps them: all 7 of layers 1-2, and of layer 0 the 4 whose input
    # needs a gradient (q, k, v read the embeddings, which do not)
    assert found["dense"] == 7 * 2 + 4
    assert found["nf4"] == 0


def test_loading_quantises_each_layer_weight_before_reading_the_next(tiny_checkpoint):
    folder, hf = tiny_checkpoint("llama", layers=3)
    read = []

    def tensors():
        for name, t in weights.iter_tensors(weights.weight_files(folder)):
            alive = [n for n, ref in read if ref() is not None and quant.is_layer_weight(n.removeprefix("model."))]
            assert not alive, f"dense layer weights still held while reading {name}: {alive}"
            read.append((name, weakref.ref(t)))
            yield name, t
            del t
    model = build_from_tensors(ModelArgs.from_hf(weights.read_config(folder)), tensors(), torch.float32, "cpu",
                               quantize="nf4")
    assert len(read) == len(list(weights.iter_tensors(weights.weight_files(folder))))
    q = model.layers[1].mlp.down_proj  # its bytes are those of the checkpoint's weight
    want = quant.quantize_nf4(hf.model.layers[1].mlp.down_proj.weight.detach())
    assert all(torch.equal(q.nf4_state()[k], want[k]) for k in want)
    assert model.embed_tokens.weight.dtype == torch.float32 and isinstance(model.lm_head, torch.nn.Linear)


# --- adapters: save, load, merge, export ----------------------------------------------------------------------------

def test_adapter_round_trip_and_merge_on_an_nf4_base(tiny_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    folder, hf = tiny_checkpoint("llama", layers=3)
    trained, _ = load_model(str(folder), dtype=torch.float32, device="cpu", quantize="nf4")
    with_lora(trained).eval()
    save_adapter(trained, tmp_path / "adapter")
    ids = torch.randint(4, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(ids)

    fresh, _ = load_model(str(folder), dtype=torch.float32, device="cpu", quantize="nf4")
    load_adapter(fresh, tmp_path / "adapter", lora_dtype=torch.float32)
    with pytest.raises(ValueError, match="re-quantise"):
        merge_lora(fresh)
    merge_and_unload(fresh)
    layer = fresh.layers[0].self_attn.q_proj
    assert isinstance(layer, quant.NF4Linear) and layer.frozen_scalings == [2.0]
    with torch.no_grad():  # merged = the adapter kept frozen: the same ops as the trained model's adapter path
        assert torch.equal(fresh.eval()(ids), want)

    # the attack stage: a fresh LoRA on top starts at the merged model (B = 0)
    apply_lora(fresh, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), want)

    # independent reference: HF + peft with the same adapter over the dequantised weights
    with torch.no_grad():
        hf_linears = [getattr(getattr(b, part), t) for b in hf.model.layers for t, part in quant.TARGETS.items()]
        for (_, _, ours), theirs in zip(quant._layer_linears(trained), hf_linears):
            theirs.weight.copy_(ours.base.dequantized())
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():  # fp32, 3 layers: the two stacks differ only in summation order (~1e-6 relative)
        torch.testing.assert_close(ref(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)

    # export: dense weights = dequantised + the frozen adapter in fp32, rounded once (fp32 here: exact sum)
    merged, _ = load_model(str(folder), dtype=torch.float32, device="cpu", quantize="nf4")
    load_adapter(merged, tmp_path / "adapter")
    quant.dequantize_model_(merge_and_unload(merged))
    assert all(isinstance(m, torch.nn.Linear) for _, _, m in quant._layer_linears(merged))
    with torch.no_grad():  # W + s B A merged vs applied on the side: fp32 rounding of the sums only
        torch.testing.assert_close(merged.eval()(ids), want, rtol=1e-5, atol=1e-5)


# --- the command line and its errors --------------------------------------------------------------------------------

def test_align_attack_evaluate_with_an_nf4_base(tiny_checkpoint, tmp_path, capsys):
    import attack
    import evaluate
    from test_attack import write_sst2
    from test_tvaccine import write_safety
    folder, _ = tiny_checkpoint("llama", layers=3)
    data = write_safety(tmp_path / "data")
    write_sst2(data)
    common = ["--model", str(folder), "--data-dir", str(data), "--max-len", "48", "--batch-size", "4",
              "--no-progress", "--quantize", "nf4", "--checkpointing"]
    tvaccine.main(common + ["--out", str(tmp_path / "align"), "--n-align", "8", "--n-harmful", "4",
                            "--harmful-batch-size", "4", "--epochs", "1", "--gamma", "2"])
    assert json.loads((tmp_path / "align" / "config.json").read_text())["quantize"] == "nf4"
    attack.main(common + ["--out", str(tmp_path / "attack"), "--aligned", str(tmp_path / "align" / "adapter"),
                          "--samples", "8", "--n-harmful-defender", "4", "--epochs", "1"])
    assert "trained on a" not in capsys.readouterr().err  # same base as the aligned run: no warning
    evaluate.main(["--model", str(folder), "--aligned", str(tmp_path / "align" / "adapter"), "--attacked",
                   str(tmp_path / "attack" / "adapter"), "--merge-and-export", str(tmp_path / "export")])
    assert "trained on a nf4 base and is now put on a dense base" in capsys.readouterr().err
    evaluate.main(["--model", str(folder), "--aligned", str(tmp_path / "align" / "adapter"), "--attacked",
                   str(tmp_path / "attack" / "adapter"), "--quantize", "nf4", "--merge-and-export",
                   str(tmp_path / "export-nf4")])
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "export-nf4" / "model.safetensors"))
    assert tensors["model.layers.0.mlp.up_proj.weight"].shape == (96, 64) and not any("packed" in k for k in tensors)


def test_flag_errors_are_clear(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit):
        tvaccine.parse_args(["--quantize", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    folder, _ = tiny_checkpoint("llama", layers=2)
    with pytest.raises(ValueError, match="'int8' is not supported; choose nf4"):
        load_model(str(folder), quantize="int8")
    args = tvaccine.parse_args(["--quantize", "nf4", "--fsdp"])
    with pytest.raises(ValueError, match="--quantize nf4 with --fsdp is not supported"):
        trainer.check_common_args(args)
    # a width whose weights are not whole blocks of 64: refused, naming the weight
    odd = ModelArgs(vocab_size=32, dim=40, n_layers=1, n_heads=4, hidden_dim=60)
    state = {k: v for k, v in Transformer(odd).state_dict().items() if k != "inv_freq"}
    with pytest.raises(ValueError, match=r"layers\.0\.\w+\.\w+_proj\.weight has (1600|2400) values, not a multiple "
                       r"of the block size 64"):
        build_from_tensors(odd, iter(state.items()), torch.float32, "cpu", quantize="nf4")
    model, _ = load_model(str(folder), device="cpu")
    apply_lora(model)
    with pytest.raises(ValueError, match="quantise the base before adding LoRA"):
        quant.quantize_model_(model)


# --- the memory tracker ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stack,method", [("ours", "tvaccine"), ("ours-nockpt", "sft")])
def test_meta_tracker_counts_the_nf4_base_as_a_real_cpu_run_does(stack, method):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # MLP weights of 96 blocks: a short scaler group, whose padding must not be kept (meta holds none)
        args = ModelArgs(vocab_size=256, dim=64, n_layers=3, n_heads=4, hidden_dim=96)
        batch, harm = bench.make_batch(3, 24, 256, 0), bench.make_batch(3, 24, 256, 1)
        S = [1, 2] if method == "tvaccine" else [0, 1, 2]
        real = bench.peak_memory(stack, args, method, "cpu", S, batch, harm, profile=True, quantize="nf4")
        meta = bench.peak_memory(stack, args, method, "meta", S, batch, harm, quantize="nf4")
    finally:
        torch.set_num_threads(before)
    assert meta["peak"] == real["peak"]
    assert abs(real["peak"] / real["allocator"] - 1) < 0.05  # the CPU allocator (+ kernel scratch) agrees
    # weights by hand: per layer 4 x 64x64 + 3 x 64x96 NF4 weights; embeddings, LM head and norms in bf16
    nf4 = 3 * sum(n // 2 + n // 64 + 4 * math.ceil(n / 16384) + 4 for n in [64 * 64] * 4 + [64 * 96] * 3)
    assert real["weights"] == meta["weights"] == nf4 + 2 * (2 * 256 * 64 + 64 * 7)
