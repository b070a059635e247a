"""T-Vaccine against independent references: HF transformers + peft with forward hooks and a plain full-graph
step written here (no checkpointing, no truncation, no autograd.grad tricks)."""
import itertools
import json
import math
import signal

import pytest
import torch

import tvaccine
from lora import apply_lora, lora_parameters, save_adapter, set_trainable_layers
from model import load_model
from tvaccine import AlignmentMethod, layer_importance, perturbation, perturbed_step, sample_layers

B, T = 4, 14


def make_batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 10:] = 0
    mask[3, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # the prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_pair(tiny_checkpoint, tmp_path, **config):
    """Our model with a random LoRA (dropout 0), and the same weights + adapter in HF transformers + peft."""
    peft = pytest.importorskip("peft")
    folder, hf = tiny_checkpoint("llama", **config)
    ours, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
    apply_lora(ours, rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_adapter(ours, tmp_path / "adapter")
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    ours.train(), ref.train()
    return ours, ref


@pytest.fixture
def pair(tiny_checkpoint, tmp_path):
    return make_pair(tiny_checkpoint, tmp_path, layers=4)


def hf_layers(ref):
    return ref.base_model.model.model.layers


def ref_forward(ref, batch, eps=None):
    """HF + peft forward that records (and optionally perturbs) each layer's attention output."""
    hs, handles = {}, []
    for l, layer in enumerate(hf_layers(ref)):
        def hook(mod, inp, out, l=l):
            h = out[0] + eps[l] if eps is not None and l in eps else out[0]
            h.retain_grad()
            hs[l] = h
            return (h,) + tuple(out[1:])
        handles.append(layer.self_attn.register_forward_hook(hook))
    loss = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    for h in handles:
        h.remove()
    return loss, hs


def ref_lora_grads(ref):
    out = {}
    for name, p in ref.named_parameters():
        if "lora_" in name and p.grad is not None:
            key = name.replace("base_model.model.model.", "").replace(".default", "")
            out[key] = p.grad.clone()
    return out


def test_importance_is_the_normalised_gradient_norm_of_the_attention_outputs(pair):
    ours, ref = pair
    batch = make_batch(96)
    P = layer_importance(ours, batch)
    loss, hs = ref_forward(ref, batch)
    loss.backward()  # the plain way: full backward, gradients everywhere
    s = torch.stack([hs[l].grad.norm() for l in range(4)])
    torch.testing.assert_close(P, s / s.sum(), rtol=1e-4, atol=1e-6)
    assert P.sum().item() == pytest.approx(1.0) and (P > 0).all()


def test_sampling_gives_distinct_sorted_layers_with_the_right_frequencies():
    P = torch.tensor([0.1, 0.2, 0.3, 0.4])
    g = torch.Generator().manual_seed(0)
    draws = [sample_layers(P, 2, g) for _ in range(20000)]
    assert all(len(set(d)) == 2 and d == sorted(d) for d in draws)
    # exact inclusion probabilities of sequential sampling without replacement, by enumeration
    exact = torch.zeros(4)
    for a, b in itertools.permutations(range(4), 2):
        exact[a] += P[a] * P[b] / (1 - P[a])
        exact[b] += P[a] * P[b] / (1 - P[a])
    freq = torch.zeros(4)
    for d in draws:
        freq[d] += 1
    freq /= len(draws)
    sd = torch.sqrt(exact * (1 - exact) / len(draws))
    assert ((freq - exact).abs() < 4 * sd).all(), (freq, exact)
    with pytest.raises(RuntimeError):
        sample_layers(P, 5, g)  # more layers than exist


def test_perturbation_has_global_norm_rho_and_no_history():
    g = [torch.randn(2, 3, 4, requires_grad=True) * 3, torch.randn(2, 3, 4, requires_grad=True)]
    eps = perturbation(g, rho=3.0)
    assert math.sqrt(sum(e.pow(2).sum().item() for e in eps)) == pytest.approx(3.0, rel=1e-5)
    assert all(not e.requires_grad and e.grad_fn is None for e in eps)
    # direction preserved: eps_l is a positive multiple of g_l
    for e, gl in zip(eps, g):
        cos = torch.nn.functional.cosine_similarity(e.flatten(), gl.detach().flatten(), dim=0)
        assert cos.item() == pytest.approx(1.0, abs=1e-6)


def trains_under(freeze: str, layers, name: str) -> bool:
    """The freezing rule, written from the flag's definition: LoRA factor `name` (layers.<l>.<part>.<target>...)
    trains with sampled layers `layers` (the authors' rule: an MLP factor trains in every layer)."""
    return int(name.split(".")[1]) in layers or (freeze == "attention" and ".mlp." in name)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("freeze", ["layers", "attention"])
def test_tvaccine_step_matches_a_plain_reference_step(pair, checkpointing, freeze):
    """S = [1, 3]: layer 0 lies below min(S), so with freeze="attention" its MLP LoRA gradient needs pass 2's
    graph from layer 0, and layer 2's MLP LoRA trains though layer 2 is not sampled."""
    ours, ref = pair
    ours.checkpointing = checkpointing
    batch, layers, rho = make_batch(96, seed=3), [1, 3], 0.5
    set_trainable_layers(ours, layers, freeze)
    loss1, loss2 = perturbed_step(ours, batch, layers, rho, freeze)
    got = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}

    # reference: full graph, every gradient computed, norm over the selected layers only
    loss, hs = ref_forward(ref, batch)
    loss.backward()
    g = {l: hs[l].grad for l in layers}
    norm = torch.sqrt(sum(v.pow(2).sum() for v in g.values()))
    eps = {l: (rho * v / (norm + 1e-7)).detach() for l, v in g.items()}
    ref.zero_grad(set_to_none=True)
    loss_p, _ = ref_forward(ref, batch, eps)
    loss_p.backward()
    want = {n: v for n, v in ref_lora_grads(ref).items() if trains_under(freeze, layers, n)}

    assert loss1 == pytest.approx(loss.item(), abs=1e-5) and loss2 == pytest.approx(loss_p.item(), abs=1e-5)
    # 2 sampled layers x 7 targets x (A, B); "attention" adds the 2 other layers x 3 MLP targets x (A, B)
    assert set(got) == set(want) and len(want) == 2 * 7 * 2 + (2 * 3 * 2 if freeze == "attention" else 0)
    assert all(want[n].abs().max() > 0 for n in want)  # every trained factor has a real gradient to compare
    for n in want:  # fp32 sums over a few hundred terms differ by ~1e-6 of the tensor's scale between kernels
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=grad_atol(want[n]))

    # and one AdamW step on both sides gives the same parameters where the step is numerically determined
    lr, wd = 1e-2, 0.1
    ref_params = {n.replace("base_model.model.model.", "").replace(".default", ""): p
                  for n, p in ref.named_parameters() if "lora_" in n}
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" in n}
    opt_ours = torch.optim.AdamW(lora_parameters(ours), lr=lr, weight_decay=wd)
    for n, p in ref_params.items():
        p.grad = want.get(n)
    opt_ref = torch.optim.AdamW(list(ref_params.values()), lr=lr, weight_decay=wd)
    opt_ours.step(), opt_ref.step()
    assert_same_first_adam_step(ours, ref_params, before, got, want, lr, wd)


def grad_atol(g: torch.Tensor) -> float:
    """Absolute gradient tolerance: 1e-5 of the tensor's largest entry. Float32 rounding differs between two
    implementations (and CPU kernels, thread counts) by about 1e-7 relative per accumulated sum; the observed
    gap here is ~5e-7 of the largest entry, so this leaves a 20x margin."""
    return 1e-5 * float(g.abs().max())


def assert_same_first_adam_step(ours, ref_params, before, got, grads, lr, wd, adam_eps=1e-8):
    """AdamW's first step moves each element by u = lr * g / (|g| + eps) after the decay: about lr * sign(g).

    A gradient error d (bounded by the tolerance above) changes u by at most lr * d * eps / |g|^2, and can flip
    its sign when |g| <= d. So the step is determined by the maths only where |g| > d and that bound is below
    1e-6: there both sides must agree to 2e-6. Elsewhere float noise, which differs between CPU kernels and
    thread counts, decides the step; we only check Adam's own bound |step| <= lr on both sides."""
    checked = total = 0
    for n, p in ours.named_parameters():
        if "lora_" not in n:
            continue
        g = grads.get(n)
        if g is None:  # a frozen layer: AdamW skips it, no decay either
            assert torch.equal(p, before[n]) and torch.equal(ref_params[n], before[n])
            continue
        d = grad_atol(g) + 1e-4 * g.abs()
        determined = (g.abs() > d) & (lr * d * adam_eps / g.pow(2) <= 1e-6)
        determined |= (g == 0) & (got[n] == 0)  # exact zeros on both sides: the step is the decay alone
        torch.testing.assert_close(p[determined], ref_params[n][determined], rtol=0, atol=2e-6)
        decayed = before[n] * (1 - lr * wd)
        for side in (p, ref_params[n]):
            assert ((side - decayed).abs() <= lr * (1 + 1e-5)).all()  # Adam's first step never exceeds lr
        checked, total = checked + int(determined.sum()), total + g.numel()
    assert checked > 0.95 * total  # the undetermined elements are the exception, not the rule


@pytest.mark.parametrize("freeze", ["layers", "attention"])
def test_freezing_changes_only_the_trainable_factors(pair, freeze, monkeypatch):
    """One step of AlignmentMethod, S forced to [2, 3] (layers 0 and 1 below min(S)): the LoRA factors with a
    nonzero gradient, and those AdamW moves, are exactly the rule's; no base weight moves."""
    ours, _ = pair
    monkeypatch.setattr(tvaccine, "sample_layers", lambda P, gamma, generator: [2, 3])
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    method = AlignmentMethod(ours, "tvaccine", rho=1.0, gamma=2, refresh_every=1, resample_every=1,
                             harmful_batches=[make_batch(96, seed=9)], seed=0, freeze=freeze)
    opt = torch.optim.AdamW(lora_parameters(ours), lr=1e-2, weight_decay=0.1)
    stats = method(0, make_batch(96, seed=4))
    assert stats["layers"] == [2, 3]
    with_grad = {n for n, p in ours.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    opt.step()
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n in before if "lora_" in n and trains_under(freeze, [2, 3], n)}
    # 7 targets (attention and MLP) x (A, B) in S; "attention": + 3 MLP targets x (A, B) in layers 0 and 1
    assert len(expected) == 2 * 7 * 2 + (2 * 3 * 2 if freeze == "attention" else 0)
    assert with_grad == expected and changed == expected


# --- the command line: resume, bad input, NaN --------------------------------------------------------------------

def write_safety(folder, n_safe=24, n_unsafe=12):
    rows = [{"prompt": f"w{4 + i % 50} w{5 + i % 40} w6", "response": f"w{10 + i % 30} w7 w8",
             "is_safe": i < n_safe, "category": "x"} for i in range(n_safe + n_unsafe)]
    (folder / "safety").mkdir(parents=True, exist_ok=True)
    (folder / "safety" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def cli_args(model, data_dir, out, *extra):
    return ["--model", str(model), "--data-dir", str(data_dir), "--out", str(out), "--n-align", "24",
            "--n-harmful", "12", "--batch-size", "4", "--harmful-batch-size", "4", "--epochs", "2",
            "--gamma", "2", "--refresh-every", "3", "--resample-every", "2", "--max-len", "48",
            "--save-every", "2", "--no-progress", *extra]


def adapter_tensors(out):
    from safetensors.torch import load_file
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("freeze", ["layers", "attention"])
def test_resume_after_interrupt_gives_bitwise_the_same_adapter(tiny_checkpoint, tmp_path, monkeypatch, freeze):
    folder, _ = tiny_checkpoint("llama", layers=4)
    data_dir = write_safety(tmp_path / "data")
    tvaccine.main(cli_args(folder, data_dir, tmp_path / "full", "--freeze", freeze))
    calls = {"n": 0}
    real = tvaccine.perturbed_step

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of step 5
        return real(*a, **kw)
    monkeypatch.setattr(tvaccine, "perturbed_step", interrupted)
    with pytest.raises(SystemExit):
        tvaccine.main(cli_args(folder, data_dir, tmp_path / "cut", "--freeze", freeze))
    monkeypatch.setattr(tvaccine, "perturbed_step", real)
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 6  # the step in flight was finished, then saved
    tvaccine.main(cli_args(folder, data_dir, tmp_path / "cut", "--freeze", freeze, "--resume"))
    full, cut = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "cut")
    assert full.keys() == cut.keys()
    assert all(torch.equal(full[k], cut[k]) for k in full)
    metrics = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(12))
    imp = [json.loads(l) for l in (tmp_path / "full" / "importance.jsonl").read_text().splitlines()]
    assert [r["step"] for r in imp] == [0, 3, 6, 9] and all(len(r["P"]) == 4 for r in imp)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["peak_memory_bytes"] > 0


@pytest.mark.parametrize("freeze", ["layers", "attention"])
def test_summary_splits_each_layers_update_by_sub_block_as_the_freezing_rule_trains_them(tiny_checkpoint, tmp_path,
                                                                                      freeze):
    """One S of one layer for the whole run (gamma 1, never resampled): attention moves in that layer only; the
    MLP in every layer under the authors' rule, in that layer only under the paper's; the parts make the whole."""
    folder, _ = tiny_checkpoint("llama", layers=4)
    out = tmp_path / freeze
    tvaccine.main(cli_args(folder, write_safety(tmp_path / "data"), out, "--freeze", freeze, "--gamma", "1",
                           "--resample-every", "1000", "--epochs", "1"))
    (S,) = {tuple(json.loads(line)["layers"]) for line in (out / "metrics.jsonl").read_text().splitlines()}
    summary = json.loads((out / "summary.json").read_text())
    total, attn, mlp = (summary[f"lora_update_norm_per_layer{k}"] for k in ("", "_attention", "_mlp"))
    assert [a > 0 for a in attn] == [l in S for l in range(4)]
    assert [m > 0 for m in mlp] == [freeze == "attention" or l in S for l in range(4)]
    assert total == pytest.approx([(a * a + m * m) ** 0.5 for a, m in zip(attn, mlp)], rel=1e-6)


def test_outputs_of_each_method(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("qwen2", layers=3)
    data_dir = write_safety(tmp_path / "data")
    for method in ("sft", "vaccine"):
        out = tmp_path / method
        tvaccine.main(cli_args(folder, data_dir, out, "--method", method, "--epochs", "1"))
        assert (out / "adapter" / "adapter_config.json").is_file()
        config = json.loads((out / "config.json").read_text())
        assert config["method"] == method and config["rho"] == 3.0 or method == "sft"
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and all(math.isfinite(r["loss"]) and r["lr"] >= 0 for r in rows)
        if method == "vaccine":
            assert rows[0]["layers"] == [0, 1, 2] and "loss_pass1" in rows[0]


@pytest.mark.parametrize("extra, message", [
    (["--gamma", "9"], "--gamma 9 exceeds the model's 4 layers"),
    (["--rho", "-1"], "--rho must be >= 0"),
    (["--method", "repnoize"], "unknown method 'repnoize'"),
    (["--n-align", "100"], "only 24 exist"),
    (["--batch-size", "30"], "fewer than one batch of 30"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--method", "vaccine", "--freeze", "attention"], "--freeze attention is T-Vaccine's"),
])
def test_bad_input_fails_before_training(tiny_checkpoint, tmp_path, extra, message):
    folder, _ = tiny_checkpoint("llama", layers=4)
    data_dir = write_safety(tmp_path / "data")
    with pytest.raises(ValueError, match=message):
        tvaccine.main(cli_args(folder, data_dir, tmp_path / "out", *extra))


def test_freeze_attention_from_the_command_line(tiny_checkpoint, tmp_path, monkeypatch):
    """--freeze attention --harmful-batch-size 1 (T-Vaccine as the authors' code runs it), one layer sampled for
    the whole run: the MLP LoRA of every layer moves, the attention LoRA of the other layers does not; importance
    sees one harmful example each time; the flag is in config.json, and a resume with the other rule is refused."""
    folder, _ = tiny_checkpoint("llama", layers=4)
    data_dir = write_safety(tmp_path / "data")
    rows, real = [], tvaccine.layer_importance

    def importance(model, batch):
        rows.append(batch["input_ids"].shape[0])
        return real(model, batch)
    monkeypatch.setattr(tvaccine, "layer_importance", importance)
    out = tmp_path / "out"
    tvaccine.main(cli_args(folder, data_dir, out, "--freeze", "attention", "--harmful-batch-size", "1",
                           "--gamma", "1", "--resample-every", "100", "--epochs", "1"))
    assert rows == [1, 1] and json.loads((out / "config.json").read_text())["freeze"] == "attention"
    (S,) = {tuple(json.loads(l)["layers"]) for l in (out / "metrics.jsonl").read_text().splitlines()}
    moved = {k.split(".")[4] + "." + k.split(".")[6] for k, v in adapter_tensors(out).items()
             if "lora_B" in k and v.abs().max() > 0}  # layers.<l>.<part>.<target>: B starts at zero
    assert moved == {f"{l}.{t}" for l in range(4) for t in ("gate_proj", "up_proj", "down_proj")} | \
        {f"{S[0]}.{t}" for t in ("q_proj", "k_proj", "v_proj", "o_proj")}
    with pytest.raises(ValueError, match="freeze='attention' \\(now 'layers'\\)"):
        tvaccine.main(cli_args(folder, data_dir, out, "--harmful-batch-size", "1", "--gamma", "1",
                               "--resample-every", "100", "--epochs", "1", "--resume"))


def test_run_saved_before_the_freeze_flag_resumes_as_layers(tmp_path):
    """A config.json written before --freeze existed has no "freeze": it ran the paper's rule, "layers"."""
    from trainer import RunDir
    config = vars(tvaccine.parse_args(["--out", str(tmp_path)]))
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "freeze"}))
    with pytest.raises(ValueError, match="freeze='layers' \\(now 'attention'\\)"):
        RunDir(tmp_path, {**config, "freeze": "attention"}, resume=True)
    RunDir(tmp_path, config, resume=True)  # the same settings: accepted


def test_empty_data_and_occupied_out_dir(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("llama", layers=4)
    empty = tmp_path / "empty"
    (empty / "safety").mkdir(parents=True)
    (empty / "safety" / "train.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        tvaccine.main(cli_args(folder, empty, tmp_path / "o1"))
    data_dir = write_safety(tmp_path / "data")
    tvaccine.main(cli_args(folder, data_dir, tmp_path / "o2", "--epochs", "1"))
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        tvaccine.main(cli_args(folder, data_dir, tmp_path / "o2", "--epochs", "1"))
    with pytest.raises(ValueError, match="holds a run with other settings: rho=3.0 \\(now 1.0\\)"):
        tvaccine.main(cli_args(folder, data_dir, tmp_path / "o2", "--epochs", "1", "--rho", "1", "--resume"))
    first = tvaccine.main(cli_args(folder, data_dir, tmp_path / "o2", "--epochs", "1", "--overwrite"))
    again = tvaccine.main(cli_args(folder, data_dir, tmp_path / "o2", "--epochs", "1", "--resume"))  # finished
    assert again["final_loss"] == first["final_loss"] and again["steps"] == first["steps"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    from trainer import NonFiniteLoss
    folder, _ = tiny_checkpoint("llama", layers=4)
    data_dir = write_safety(tmp_path / "data")
    calls = {"n": 0}
    real = tvaccine.perturbed_step

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss1, loss2 = real(*a, **kw)
        return (loss1, float("nan")) if calls["n"] == 4 else (loss1, loss2)
    monkeypatch.setattr(tvaccine, "perturbed_step", poisoned)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 3"):
        tvaccine.main(cli_args(folder, data_dir, tmp_path / "out"))
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_init_adapter_trains_on_top_and_saves_both(tiny_checkpoint, tmp_path):
    """--init-adapter: the saved adapter stacks both ranks (the algebra is checked in test_lora), so it loads on
    the plain base like any other; a folder without an adapter is refused before training."""
    from lora import load_adapter
    from model import load_model
    folder, _ = tiny_checkpoint("llama", layers=3)
    data_dir = write_safety(tmp_path / "data")
    tvaccine.main(cli_args(folder, data_dir, tmp_path / "sft", "--method", "sft", "--epochs", "1"))
    tvaccine.main(cli_args(folder, data_dir, tmp_path / "tar", "--method", "tar", "--epochs", "1",
                           "--init-adapter", str(tmp_path / "sft" / "adapter")))
    config = json.loads((tmp_path / "tar" / "adapter" / "adapter_config.json").read_text())
    sft_config = json.loads((tmp_path / "sft" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 * sft_config["r"]
    base, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
    load_adapter(base, tmp_path / "tar" / "adapter")  # a plain adapter of the base model
    with pytest.raises(FileNotFoundError, match="--init-adapter .*no adapter_config.json"):
        tvaccine.main(cli_args(folder, data_dir, tmp_path / "x", "--init-adapter", str(tmp_path)))
