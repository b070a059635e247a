"""RepNoise and TAR (defences.py) against independent references: plain double-loop MMD, full-vocabulary logits of
every position from HF transformers + peft (hidden states, MLP outputs, the base model via disable_adapter), and
TAR's inner attack run by hand with plain backward passes.

Tolerances: everything is fp32 on tiny models (3 layers, width 64, at most 56 tokens), where the two sides differ
only by summation order (answer-only vs full-vocabulary projections, unpadded vs padded layout, Gram matrix vs
explicit differences): ~1e-6 relative, whatever the CPU or thread count; rtol 1e-4 leaves two orders of margin."""
import json
import math
import signal

import pytest
import torch
import torch.nn.functional as F

import defences
import tvaccine
from defences import (answer_targets, mmd2, noise_mmd, repnoise_step, repnoise_terms, tamper_schedule, tar_step)
from lora import lora_parameters
from test_tvaccine import B, T, adapter_tensors, cli_args, make_pair, write_safety
from test_tvaccine import make_batch as tvaccine_batch

VOCAB = 600  # a vocabulary above 256: bf16 cannot hold most token ids exactly


def make_batch(seed):
    return tvaccine_batch(VOCAB, seed)


@pytest.fixture
def pair(tiny_checkpoint, tmp_path):
    return make_pair(tiny_checkpoint, tmp_path, layers=3, vocab_size=VOCAB)


def ref_states(ref, batch):
    """HF: (logits, residual stream x_0..x_L as (B, T, dim), MLP outputs a_0..a_(L-1)). HF's last hidden state is
    after the final norm, so x_L is taken from the norm's input."""
    decoder = ref.base_model.model.model
    mlp, final, hooks = {}, {}, []
    for l, layer in enumerate(decoder.layers):
        hooks.append(layer.mlp.register_forward_hook(lambda m, i, o, l=l: mlp.__setitem__(l, o)))
    hooks.append(decoder.norm.register_forward_hook(lambda m, i, o: final.__setitem__("x", i[0])))
    out = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    for h in hooks:
        h.remove()
    residual = list(out.hidden_states[:-1]) + [final["x"]]
    return out.logits, residual, [mlp[l] for l in range(len(decoder.layers))]


def full_vocab_ce(logits, labels):
    """Next-token CE over every position, labels -100 ignored: the plain HF loss."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


def plain_mmd2(x, y):
    """The MMD formula written out with a double loop over sample pairs."""
    z = torch.cat([x, y]).double()
    m = z.shape[0]
    d = [[((z[i] - z[j]) ** 2).sum() for j in range(m)] for i in range(m)]
    s = sum(d[i][j] for i in range(m) for j in range(m) if i != j).detach() / (m * (m - 1))
    k = [[sum(torch.exp(-d[i][j] / (s * 2.0 ** (q - 2))) for q in range(5)) for j in range(m)] for i in range(m)]
    n = x.shape[0]
    total = sum(k[i][j] + k[n + i][n + j] - k[i][n + j] - k[n + i][j] for i in range(n) for j in range(n))
    return total / (n * n)


def ref_noise_mmd(a, mask, generator):
    """a: (B, T, dim); noise drawn as defences draws it (M rows, (b, t) order), then noise * mask, flattened."""
    M = int(mask.sum())
    noise = torch.zeros_like(a, dtype=torch.float32)
    noise[mask] = torch.randn(M, a.shape[-1], generator=generator)
    x = (a * mask[..., None]).flatten(1)
    return plain_mmd2(x, noise.flatten(1))


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def ref_lora_grads(ref):
    return {n.replace("base_model.model.model.", "").replace(".default", ""): p.grad.clone()
            for n, p in ref.named_parameters() if "lora_" in n}


# --- RepNoise ----------------------------------------------------------------------------------------------------

def test_mmd2_and_its_gradient_match_the_double_loop_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, generator=g, requires_grad=True)
    y = torch.randn(5, 12, generator=g) * 1.5 + 0.3
    got = mmd2(x, y)
    want = plain_mmd2(x, y)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    (gx,) = torch.autograd.grad(got, x)
    (wx,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(gx, wx.float(), rtol=1e-4, atol=1e-7)
    assert mmd2(x, x.detach().clone()).abs().item() < 1e-6  # same samples: no discrepancy


def test_noise_mmd_is_the_mmd_of_masked_flattened_samples():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 6, 4, generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.5
    where = mask.nonzero()
    got = noise_mmd(a[mask], where[:, 0], where[:, 1], 3, 6, torch.Generator().manual_seed(7))
    want = ref_noise_mmd(a, mask, torch.Generator().manual_seed(7))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_recorded_rows_are_hf_hidden_states_and_mlp_outputs(pair):
    ours, ref = pair
    batch = make_batch(2)
    at = batch["labels"] != -100
    _, states = ours.forward_hidden(batch["input_ids"], batch["attention_mask"], record_at=at)
    _, residual, mlp = ref_states(ref, batch)
    assert len(states["residual"]) == 4 and len(states["mlp"]) == 3
    for got, want in zip(states["residual"] + states["mlp"], residual + mlp):
        torch.testing.assert_close(got, want[at], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="padding"):
        ours.forward_hidden(batch["input_ids"], batch["attention_mask"], record_at=torch.ones(B, T, dtype=bool))


def test_harmful_targets_are_the_true_token_ids():
    batch = make_batch(3)
    targets = answer_targets(batch["labels"])
    truth = torch.tensor([t for row in batch["labels"].tolist() for t in row[1:] if t != -100])
    assert torch.equal(targets, truth) and targets.dtype == torch.long
    # the public code's cast: most of these ids (up to 599) are not representable in bf16
    rounded = (truth.to(torch.bfloat16) * torch.ones((), dtype=torch.bfloat16)).long()
    assert (truth > 256).sum() >= 5 and (rounded != truth).sum() >= 5


@pytest.mark.parametrize("checkpointing", [False, True])
def test_repnoise_terms_and_gradient_match_a_full_vocabulary_reference(pair, checkpointing):
    ours, ref = pair
    ours.checkpointing = checkpointing
    safe, harmful = make_batch(4), make_batch(5)
    alpha, beta = 0.5, 0.5  # large enough that both harmful terms shape the gradient
    terms = repnoise_terms(ours, harmful, torch.Generator().manual_seed(11))

    logits, residual, mlp = ref_states(ref, harmful)
    lm_head, norm = ref.base_model.model.lm_head, ref.base_model.model.model.norm
    ce = torch.stack([full_vocab_ce(lm_head(norm(x)), harmful["labels"]) for x in residual])  # every position
    torch.testing.assert_close(ce[-1], full_vocab_ce(logits, harmful["labels"]))  # x_L's lens = the final logits
    is_answer = harmful["labels"] != -100
    gen = torch.Generator().manual_seed(11)
    mmd = torch.stack([ref_noise_mmd(a, is_answer, gen) for a in mlp])
    torch.testing.assert_close(terms["ce"], ce, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["mmd"], mmd.float(), rtol=1e-4, atol=1e-6)
    assert terms["H"].item() == pytest.approx(1 + ce.mean().item(), rel=1e-5)

    # the whole step's LoRA gradient against plain autograd through the reference
    for p in lora_parameters(ours):
        p.grad = None
    stats = repnoise_step(ours, safe, harmful, alpha, beta, torch.Generator().manual_seed(11))
    got = lora_grads(ours)
    ref.zero_grad(set_to_none=True)
    safe_logits, _, _ = ref_states(ref, safe)
    logits, residual, mlp = ref_states(ref, harmful)
    ce = torch.stack([full_vocab_ce(lm_head(norm(x)), harmful["labels"]) for x in residual])
    gen = torch.Generator().manual_seed(11)
    mmd = torch.stack([ref_noise_mmd(a, is_answer, gen) for a in mlp]).mean()
    loss = full_vocab_ce(safe_logits, safe["labels"]) + beta * mmd - alpha * torch.log(1 + ce.mean())
    loss.backward()
    want = ref_lora_grads(ref)
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert got.keys() == want.keys() and len(got) == 3 * 7 * 2
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)


# --- TAR ---------------------------------------------------------------------------------------------------------

def test_tamper_schedule_grows_toward_the_end_and_sums_to_one():
    assert tamper_schedule(4, 2) == {2: 2 / 6, 4: 4 / 6}
    assert tamper_schedule(3, 2) == {2: 2 / 5, 3: 3 / 5}
    assert tamper_schedule(1, 5) == {1: 1.0}


def plain_max_entropy(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"])[:, :-1]  # every position, full vocabulary
    logp = F.log_softmax(logits[batch["labels"][:, 1:] != -100].float(), dim=-1)
    return (logp.exp() * logp).sum(-1).mean()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tar_outer_gradient_is_retain_plus_weighted_tamper_gradients(pair, checkpointing):
    ours, ref = pair
    ours.checkpointing = checkpointing
    params = lora_parameters(ours)
    theta = [p.detach().clone() for p in params]
    safe, attacks, tamper = make_batch(6), [make_batch(7), make_batch(8), make_batch(9)], make_batch(10)
    inner_lr, weight = 1e-2, 100.0  # near-uniform outputs of a random model: small entropy gradients, scaled up

    # (a) the attacker by hand: plain backward passes, full-vocabulary losses; tamper loss after steps 2 and 3
    opt = torch.optim.AdamW(params, lr=inner_lr, weight_decay=0.0)
    g_tr = [torch.zeros_like(p) for p in params]
    for k, attack in enumerate(attacks, start=1):
        opt.zero_grad(set_to_none=True)
        full_vocab_ce(ours(attack["input_ids"], attack["attention_mask"]), attack["labels"]).backward()
        opt.step()
        if k in (2, 3):
            for acc, g in zip(g_tr, torch.autograd.grad(plain_max_entropy(ours, tamper), params)):
                acc += {2: 0.4, 3: 0.6}[k] * g
    moved = max((p - t).abs().max().item() for p, t in zip(params, theta))
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)
            p.grad = None

    # (b) the retain gradient at theta, in the reference stack: CE + mean L2 to the base model's hidden states
    logits, residual, _ = ref_states(ref, safe)
    with torch.no_grad(), ref.disable_adapter():
        _, base, _ = ref_states(ref, safe)
    real = safe["attention_mask"].bool()
    l2 = torch.stack([(x - b).norm(dim=-1)[real].mean() for x, b in zip(residual, base)]).mean()
    (full_vocab_ce(logits, safe["labels"]) + l2).backward()
    retain = ref_lora_grads(ref)
    names = [n for n, p in ours.named_parameters() if "lora_" in n]
    want = {n: retain[n] + weight * g for n, g in zip(names, g_tr)}

    stats = tar_step(ours, params, safe, attacks, tamper, inner_lr, tr_every=2, tr_weight=weight)
    got = lora_grads(ours)
    assert moved > 1e-3  # the attacker really moved the weights: the tamper gradients are taken elsewhere than theta
    assert all(torch.equal(p, t) for p, t in zip(params, theta))  # theta restored exactly
    tamper_norm = math.sqrt(sum(g.pow(2).sum().item() for g in g_tr)) * weight
    assert tamper_norm > math.sqrt(sum(g.pow(2).sum().item() for g in retain.values()))  # dropping it would show
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)
    assert stats["retain_l2"] > 0 and stats["tamper_loss"] < 0


# --- the command line --------------------------------------------------------------------------------------------

def assert_plain(obj):
    """Only what torch.load(weights_only=True) accepts: tensors and plain Python containers and scalars."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert_plain(k), assert_plain(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            assert_plain(v)
    else:
        assert obj is None or type(obj) in (torch.Tensor, int, float, str, bool), type(obj)


@pytest.mark.parametrize("method, step", [("repnoise", "repnoise_step"), ("tar", "tar_step")])
def test_resume_after_interrupt_gives_bitwise_the_same_adapter(tiny_checkpoint, tmp_path, monkeypatch, method,
                                                               step):
    folder, _ = tiny_checkpoint("llama", layers=3)
    data_dir = write_safety(tmp_path / "data")
    extra = ["--method", method, "--tar-inner-steps", "2", "--tar-inner-lr", "1e-2"]
    tvaccine.main(cli_args(folder, data_dir, tmp_path / "full", *extra))
    calls, real = {"n": 0}, getattr(defences, step)

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of step 5
        return real(*a, **kw)
    monkeypatch.setattr(defences, step, interrupted)
    with pytest.raises(SystemExit):
        tvaccine.main(cli_args(folder, data_dir, tmp_path / "cut", *extra))
    monkeypatch.setattr(defences, step, real)
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 6
    assert_plain(ck["method"])  # loads with weights_only=True once the rest of the checkpoint does
    tvaccine.main(cli_args(folder, data_dir, tmp_path / "cut", *extra, "--resume"))
    full, cut = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "cut")
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)
    metrics = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(12)) and all(math.isfinite(m["loss"]) for m in metrics)
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["method"] == method and config["tar_inner_steps"] == 2
    assert (tmp_path / "full" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--repnoise-alpha", "-0.1"], "--repnoise-alpha must be >= 0"),
    (["--repnoise-beta", "nan"], "--repnoise-beta must be >= 0"),
    (["--tar-inner-steps", "0"], "--tar-inner-steps must be >= 1"),
    (["--tar-tamper-every", "0"], "--tar-tamper-every must be >= 1"),
    (["--tar-inner-lr", "0"], "--tar-inner-lr must be > 0"),
    (["--tar-weight", "-1"], "--tar-weight must be >= 0"),
])
def test_bad_flags_fail_before_any_weights_are_read(tmp_path, extra, message):
    # a model path that does not exist: the flag check must come first
    with pytest.raises(ValueError, match=message):
        tvaccine.main(cli_args(tmp_path / "no-model", tmp_path, tmp_path / "out", "--method", "tar", *extra))


@pytest.mark.parametrize("method", ["repnoise", "tar"])
def test_too_little_harmful_data_is_an_error(tiny_checkpoint, tmp_path, method):
    folder, _ = tiny_checkpoint("llama", layers=3)
    data_dir = write_safety(tmp_path / "data")
    with pytest.raises(ValueError, match="fewer than --harmful-batch-size 8"):
        tvaccine.main(cli_args(folder, data_dir, tmp_path / "out", "--method", method, "--n-harmful", "6",
                               "--harmful-batch-size", "8"))
