"""T-Vaccine: safety alignment with layer-wise perturbation (Liu et al., arXiv 2410.09760), plus Vaccine and SFT;
the alignment command, which also runs the other defences of the paper's comparison (defences.py: RepNoise, TAR).

    python tvaccine.py --model llama2-7b                      # the paper's setting (BeaverTails from the Hub)
    python tvaccine.py --data-dir ../shared/data --n-align 1000 --epochs 1   # small CPU run on smollm2-135m
    python tvaccine.py --model llama2-7b --method repnoise    # or tar: the baselines, same data, LoRA, outputs

The algorithm (SPEC section 6) is the first section below, top to bottom:
- `layer_importance`: P_l = ||dL_h/dh_l||_F / sum_j ||dL_h/dh_j||_F on a batch of harmful data D_h.
- `sample_layers`: gamma distinct layers drawn without replacement with probabilities P (sorted).
- `perturbed_step`: pass 1 gives dL/dh_l for the chosen layers; eps_l = rho * g_l / ||g||_global; pass 2
  trains the chosen layers' LoRA with h_l + eps_l (eps constant). Vaccine = all layers; SFT = no perturbation.
- Freezing (`--freeze`): `layers` (the paper, the default): only the LoRA of S trains, attention and MLP.
  `attention`: the rule of the authors' public code (github.com/Lslland/T-Vaccine, trainer.py,
  `BaseTrainer.unfreeze_activate_layers`: requires_grad goes off for the `lora` parameters of every attention
  module that `get_leaf_modules_with_grad` collects, one per layer, and back on for those of S; the MLP's LoRA is
  never touched, so get_peft_model's requires_grad=True stays on in every layer). Their perturbation is on the
  attention outputs of S only, as here (`pre_first_step` / `pre_second_step`: backward and forward hooks on the
  same attention modules). Their importance uses one harmful example (`BaseTrainer.get_dataloader`, batch size
  1): `--harmful-batch-size 1`.
- Memory: layers below min(S) run without a graph, the rest are checkpointed (flag), neither backward goes
  below min(S) (with `--freeze attention` pass 2's does: the MLP LoRA of layer 0 trains), and pass 1 computes
  no weight gradients at all (autograd.grad on h only).
- Under torchrun (dist.py) each rank holds the rows of its share of a batch; the losses are divided by the
  global batch's target count, and the norms that make P and eps are summed (squared) over the ranks, so every
  rank computes the single-process P, S and eps.
"""
from __future__ import annotations

import argparse

import torch

import dist
from lora import FREEZE_RULES
from trainer import add_common_args, check_adapter_folder, check_common_args, cli

# ----------------------------------------------------------------------------------------------------------------
# The algorithm


def batch_loss(model, x, labels) -> torch.Tensor:
    """model.loss; under data parallelism this rank's share of the global batch's mean (see dist.py)."""
    return model.loss(x, labels, dist.global_target_count(labels))


def importance_norms(model, batch: dict) -> torch.Tensor:
    """||dL_h/dh_l||_F for every layer l on the clean (unperturbed) model (data parallel: over the global batch,
    each rank's squared norms summed over the ranks, as its dL_h/dh_l are its rows of the global batch's)."""
    norms = {}
    # Each dL/dh_l is reduced to its norm as backward reaches it, and no h_l is kept alive (at 7B, B 10 x 200,
    # this pass then peaks at 14.31 GiB instead of 14.78). The backward runs down to h_0, no weight gradients.
    hooks = {l: (lambda g, l=l: norms.__setitem__(l, g.float().norm())) for l in range(1, model.args.n_layers)}
    x, h = model.forward_hidden(batch["input_ids"], batch["attention_mask"], expose=[0], on_grad=hooks)
    (g0,) = torch.autograd.grad(batch_loss(model, x, batch["labels"]), [h[0]])
    norms[0] = g0.float().norm()
    s = torch.stack([norms[l] for l in range(model.args.n_layers)])
    return dist.global_norm(s.pow(2)) if dist.parallel() else s


def layer_importance(model, batch: dict) -> torch.Tensor:
    """P over layers: the normalised norms of dL_h/dh_l (`importance_norms`).

    P is broadcast from rank 0, so that the ranks, which sample S from P with identically seeded generators,
    cannot draw different layers even if a reduction rounded differently on one of them."""
    s = importance_norms(model, batch)
    P = (s / s.sum()).cpu()  # plain normalisation, no softmax (paper, eq. 4)
    dist.broadcast_from_main([P])
    return P


def sample_layers(P: torch.Tensor, gamma: int, generator: torch.Generator) -> list[int]:
    """gamma distinct layers, drawn one after another with probability proportional to P among the rest."""
    return sorted(torch.multinomial(P, gamma, replacement=False, generator=generator).tolist())


def perturbation(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """eps_l = rho * g_l / (||g|| + 1e-7), with one global norm over all perturbed layers and the whole batch
    (data parallel: the whole global batch, each rank's squared norm summed over the ranks)."""
    norm = dist.global_norm(sum(g.float().pow(2).sum() for g in grads))
    return [(rho * g.float() / (norm + 1e-7)).to(g.dtype).detach() for g in grads]


def perturbed_step(model, batch: dict, layers: list[int], rho: float, freeze: str = "layers") -> tuple[float, float]:
    """Vaccine's two passes restricted to `layers`; backward of pass 2 leaves the gradients of the trainable LoRA
    (lora.set_trainable_layers with the same `freeze`): of `layers` only, or with freeze="attention" the MLP LoRA
    of every layer too."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    lowest = min(layers)  # pass 1 needs no gradient below it
    train_from = lowest if freeze == "layers" else 0  # pass 2: the lowest layer with trainable LoRA
    # Pass 1: the gradient of the loss w.r.t. the attention outputs h_l only.
    x, h = model.forward_hidden(ids, mask, expose=layers, grad_from=lowest)
    loss1 = batch_loss(model, x, labels)
    grads = torch.autograd.grad(loss1, [h[l] for l in layers])
    eps = dict(zip(layers, perturbation(list(grads), rho)))
    del x, h, grads
    # Pass 2: the same batch with h_l + eps_l; the usual backward for the trainable LoRA weights.
    x, _ = model.forward_hidden(ids, mask, perturb=eps, grad_from=train_from)
    loss2 = batch_loss(model, x, labels)
    loss2.backward()
    return loss1.item(), loss2.item()


def sft_step(model, batch: dict) -> float:
    x, _ = model.forward_hidden(batch["input_ids"], batch["attention_mask"])
    loss = batch_loss(model, x, batch["labels"])
    loss.backward()
    return loss.item()


class AlignmentMethod:
    """What one alignment step does for `sft`, `vaccine` or `tvaccine`, with the state T-Vaccine carries
    between steps (P, S, the sampler's generator, the harmful batches); saved in every checkpoint.
    freeze: T-Vaccine's rule for the LoRA outside S (lora.set_trainable_layers)."""

    def __init__(self, model, method: str, rho: float, gamma: int, refresh_every: int, resample_every: int,
                 harmful_batches=None, seed: int = 0, log=None, freeze: str = "layers"):
        self.model, self.method, self.rho, self.gamma, self.freeze = model, method, rho, gamma, freeze
        self.K, self.J = refresh_every, resample_every
        self.harmful_batches, self.log = harmful_batches, log or (lambda *a: None)
        self.generator = torch.Generator().manual_seed(seed)
        self.P, self.S = None, list(range(model.args.n_layers))

    def __call__(self, step: int, batch: dict) -> dict:
        from lora import set_trainable_layers

        if self.method == "sft":
            return {"loss": sft_step(self.model, batch)}
        if self.method == "tvaccine":
            if step % self.K == 0 or self.P is None:
                self.P = layer_importance(self.model, self._harmful_batch(batch["input_ids"].device))
                self.log("importance.jsonl", {"step": step, "P": self.P.tolist()})
            if step % self.J == 0:
                self.S = sample_layers(self.P, self.gamma, self.generator)
            set_trainable_layers(self.model, self.S, self.freeze)
        loss1, loss2 = perturbed_step(self.model, batch, self.S, self.rho, self.freeze)
        return {"loss": loss2, "loss_pass1": loss1, "layers": self.S}

    def _harmful_batch(self, device) -> dict:
        batch = next(iter(self.harmful_batches))  # Batches cycles through D_h epoch after epoch
        return {k: v.to(device) for k, v in dist.local_rows(batch).items()}

    def state_dict(self) -> dict:
        return {"P": self.P, "S": self.S, "generator": self.generator.get_state(),
                "harmful_batches": self.harmful_batches.state_dict() if self.harmful_batches else None}

    def load_state_dict(self, state: dict):
        self.P, self.S = state["P"], state["S"]
        self.generator.set_state(state["generator"])
        if self.harmful_batches is not None:
            self.harmful_batches.load_state_dict(state["harmful_batches"])


# ----------------------------------------------------------------------------------------------------------------
# Command line: every hyperparameter a flag, with the paper's default (SPEC section 2)

METHODS = ("tvaccine", "vaccine", "sft", "repnoise", "tar")
NEEDS_HARMFUL = ("tvaccine", "repnoise", "tar")  # methods that draw batches of D_h


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="tvaccine", help=f"one of {', '.join(METHODS)}")
    add_common_args(p, lr=1e-3)
    p.add_argument("--rho", type=float, default=3.0, help="perturbation radius")
    p.add_argument("--gamma", type=int, default=8, help="layers perturbed and trained per step (T-Vaccine)")
    p.add_argument("--refresh-every", type=int, default=200, help="K: steps between layer-importance refreshes")
    p.add_argument("--resample-every", type=int, default=20, help="J: steps between layer resamples")
    p.add_argument("--freeze", choices=FREEZE_RULES, default="layers", help="T-Vaccine: the LoRA frozen outside "
                   "the sampled layers S. layers: all of it, attention and MLP (the paper); attention: the attention "
                   "LoRA (q,k,v,o) only, the MLP LoRA of every layer trains every step (the authors' code; with "
                   "--harmful-batch-size 1, their importance from one harmful example, T-Vaccine as their code runs "
                   "it). The perturbation is on S's attention outputs either way")
    p.add_argument("--harmful-batch-size", type=int, default=10, help="D_h batch: T-Vaccine's importance "
                   "(reference: 1), RepNoise's x_h, TAR's attacker and tamper batches")
    p.add_argument("--n-align", type=int, default=2000, help="N_a: safe (prompt, refusal) pairs, D_a")
    p.add_argument("--n-harmful", type=int, default=200, help="N_h: harmful pairs, D_h (importance, RepNoise, TAR)")
    p.add_argument("--repnoise-alpha", type=float, default=0.1, help="RepNoise: weight of -log H (harmful CE)")
    p.add_argument("--repnoise-beta", type=float, default=0.001, help="RepNoise: weight of the noise MMD")
    p.add_argument("--tar-inner-steps", type=int, default=4, help="TAR: K, the attacker's SFT steps per step")
    p.add_argument("--tar-inner-lr", type=float, default=1e-4, help="TAR: the attacker's AdamW learning rate")
    p.add_argument("--tar-tamper-every", type=int, default=2, help="TAR: tamper-resistance loss after every "
                   "N-th inner step (and the last)")
    p.add_argument("--tar-weight", type=float, default=4.0, help="TAR: weight of the tamper-resistance gradient")
    p.add_argument("--init-adapter", default=None, help="an aligned adapter folder to merge into the base before "
                   "this alignment (e.g. TAR on top of SFT, as the TAR authors start from a model that already "
                   "refuses); the saved adapter holds both, so attack.py and evaluate.py take it as any other")
    args = p.parse_args(argv)
    args.out = args.out or f"runs/align-{args.method}"
    return args


def check_args(args):
    check_common_args(args)
    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.method in ("repnoise", "tar") and dist.parallel():
        # RepNoise's MMD compares every pair of harmful samples, across ranks too; TAR runs an inner attack with
        # its own optimizer: neither is split over ranks here, and a per-rank version would be another method.
        raise ValueError(f"--method {args.method} runs in one process only; data parallelism (torchrun) "
                         "supports sft, vaccine and tvaccine")
    if args.freeze != "layers" and args.method != "tvaccine":
        raise ValueError(f"--freeze {args.freeze} is T-Vaccine's (--method tvaccine); {args.method} has no sampled "
                         "layers to freeze around")
    if args.rho < 0:
        raise ValueError(f"--rho must be >= 0 (got {args.rho})")
    for name in ("gamma", "refresh_every", "resample_every", "harmful_batch_size", "n_align", "n_harmful",
                 "tar_inner_steps", "tar_tamper_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    for name in ("repnoise_alpha", "repnoise_beta", "tar_weight"):
        if not getattr(args, name) >= 0:  # also catches NaN
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})")
    if not args.tar_inner_lr > 0:
        raise ValueError(f"--tar-inner-lr must be > 0 (got {args.tar_inner_lr})")
    check_adapter_folder("--init-adapter", args.init_adapter)


def load_alignment_data(args, tokenizer):
    import data
    rows = data.load_safety("train", args.data_dir)
    d_a = data.alignment_set(rows, args.n_align)
    d_h = data.harmful_set(rows, args.n_harmful) if args.method in NEEDS_HARMFUL else []
    if len(d_a) < args.batch_size:
        raise ValueError(f"D_a has {len(d_a)} examples, fewer than one batch of {args.batch_size}")
    if args.method in NEEDS_HARMFUL and len(d_h) < args.harmful_batch_size:
        raise ValueError(f"D_h has {len(d_h)} examples, fewer than --harmful-batch-size {args.harmful_batch_size}")
    pad = data.pad_id_of(tokenizer)
    examples = data.tokenize_dataset(tokenizer, d_a, args.max_len, "D_a")
    dist.check_split(len(examples), args.batch_size, "--batch-size", "D_a")
    batches = data.Batches(examples, args.batch_size, pad, seed=args.seed)
    harmful = None
    if d_h:
        examples = data.tokenize_dataset(tokenizer, d_h, args.max_len, "D_h")
        dist.check_split(len(examples), args.harmful_batch_size, "--harmful-batch-size", "D_h")
        harmful = data.Batches(examples, args.harmful_batch_size, pad, seed=args.seed + 1)
    return batches, harmful


def make_method(args, model, harmful, log):
    """The step function (with its state) of --method."""
    if args.method in ("repnoise", "tar"):
        from defences import DefenceMethod
        return DefenceMethod(model, args.method, harmful, alpha=args.repnoise_alpha, beta=args.repnoise_beta,
                             inner_steps=args.tar_inner_steps, inner_lr=args.tar_inner_lr,
                             tr_every=args.tar_tamper_every, tr_weight=args.tar_weight)
    return AlignmentMethod(model, args.method, args.rho, args.gamma, args.refresh_every, args.resample_every,
                           harmful, seed=args.seed, log=log, freeze=args.freeze)


def main(argv=None):
    from lora import lora_parameters, lora_update_norms, save_adapter, save_stacked_adapter
    from trainer import RunDir, count_layers, prepare_model, seed_everything, train

    args = parse_args(argv)
    check_args(args)
    n_layers = count_layers(args.model)
    if args.method == "tvaccine" and args.gamma > n_layers:
        raise ValueError(f"--gamma {args.gamma} exceeds the model's {n_layers} layers")
    run = RunDir(args.out, vars(args), resume=args.resume, overwrite=args.overwrite)
    seed_everything(args.seed)
    model, tokenizer = prepare_model(args, adapter_to_merge=args.init_adapter)
    batches, harmful = load_alignment_data(args, tokenizer)
    method = make_method(args, model, harmful, run.log)
    params = lora_parameters(model)
    summary = train(model, params, batches, method, run, lr=args.lr, epochs=args.epochs,
                    weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                    max_grad_norm=args.max_grad_norm, save_every=args.save_every, resume=args.resume,
                    method_state=method, progress=args.progress, desc=args.method)
    if dist.is_main() and args.init_adapter:
        save_stacked_adapter(model, args.init_adapter, run.path / "adapter", base_model_name_or_path=args.model)
    elif dist.is_main():
        save_adapter(model, run.path / "adapter", base_model_name_or_path=args.model)
    summary.update(method=args.method, model=args.model, n_layers=n_layers,
                   lora_update_norm_per_layer=lora_update_norms(model),  # which layers training really moved
                   lora_update_norm_per_layer_attention=lora_update_norms(model, "self_attn"),
                   lora_update_norm_per_layer_mlp=lora_update_norms(model, "mlp"))
    if dist.parallel():
        summary.update(processes=dist.world_size(), fsdp=args.fsdp)
    run.write_summary(summary)
    dist.barrier()  # the adapter is on disk when any rank returns
    if dist.is_main():
        print(f"[{args.method}] done: {summary['steps']} steps in {summary['train_time_s']:.1f}s, final loss "
              f"{summary['final_loss']:.4f}, peak memory {summary['peak_memory_gib']:.2f} GiB "
              f"({summary['peak_memory_kind']}); adapter in {run.path / 'adapter'}")
    return summary


if __name__ == "__main__":
    cli(main)
