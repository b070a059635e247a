"""The paper's other defences, baselines to T-Vaccine: RepNoise (Rosati et al. 2024) and TAR (Tamirisa et al. 2024).

    python tvaccine.py --method repnoise --data-dir ../shared/data --n-align 100 --epochs 1
    python tvaccine.py --method tar --data-dir ../shared/data --n-align 100 --epochs 1

Both train the same LoRA as T-Vaccine on the same D_a, with a harmful batch from D_h (`--n-harmful`,
`--harmful-batch-size`) each step, through the same run machinery (trainer.py: outputs, resume, progress, errors).
- `repnoise_step`: L = CE(x_s) + beta * MMD_noise(x_h) - alpha * log H(x_h) (formulas in the docstrings below).
- `tar_step`: first-order adversarial meta-learning: K inner SFT steps of an attacker on harmful pairs, the
  max-entropy tamper-resistance loss at the attacked weights, then the retain loss at the restored weights.
- Memory: every per-layer loss (33 logit-lens projections, 32 MMDs, 33 L2 distances at 7B) runs through
  `grad_now`, so its intermediates (a (M, vocab) logit matrix, a (2B, T * dim) sample matrix) live one layer at a
  time; only answer positions are projected; TAR keeps LoRA snapshots, never a model copy.
Where the public code (Lslland/T-Vaccine) goes wrong and we do not: docs/DEFENCES.md, "What the public code gets wrong".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Shared pieces


class _GradNow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fn):
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            y = fn(leaf)
            (g,) = torch.autograd.grad(y, leaf)
        ctx.save_for_backward(g)
        return y.detach()

    @staticmethod
    def backward(ctx, grad_y):
        (g,) = ctx.saved_tensors
        return grad_y * g, None


def grad_now(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for a scalar fn, with dfn/dx computed at once and kept in place of fn's graph.

    The backward then multiplies that gradient by the incoming one: the same result as autograd through fn, but
    what fn builds (a logit matrix, a Gram matrix's inputs) is freed before the next layer's fn runs, and nothing
    is recomputed. Only x's gradient is kept: fn's other inputs (final norm, LM head) are frozen base weights."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return fn(x)
    return _GradNow.apply(x, fn)


def next_token_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions t whose next token t + 1 is an answer token (where model.loss projects)."""
    at = torch.zeros_like(labels, dtype=torch.bool)
    at[:, :-1] = labels[:, 1:] != -100
    return at


def answer_targets(labels: torch.Tensor) -> torch.Tensor:
    """The answer token ids, in (b, t) order: the labels themselves, never cast through a float dtype."""
    targets = labels[:, 1:]
    return targets[targets != -100]


def sft_loss(model, batch: dict) -> torch.Tensor:
    x, _ = model.forward_hidden(batch["input_ids"], batch["attention_mask"])
    return model.loss(x, batch["labels"])


# ----------------------------------------------------------------------------------------------------------------
# RepNoise


def mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 between samples x (n, D) and y (n, D): mean(K_xx + K_yy - K_xy - K_yx), with
    K(a, b) = sum_k exp(-||a - b||^2 / s_k), s_k = s * 2^(k - 2), k = 0..4, s = the mean squared distance over
    the pooled samples' distinct pairs (detached).

    Distances come from the (2n, 2n) Gram matrix, ||a||^2 + ||b||^2 - 2 a.b, in fp32: no (2n, 2n, D) tensor
    of differences (the public code's, 655 MB per layer at 7B in bf16, kept for backward)."""
    n = x.shape[0]
    z = torch.cat([x, y]).float()
    sq = z.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp(min=0)  # rounding can dip below 0
    off_diagonal = ~torch.eye(2 * n, dtype=torch.bool, device=z.device)
    d = d * off_diagonal  # exact zeros on the diagonal, as a - a
    s = d.detach().sum() / (4 * n * n - 2 * n)
    k = sum(torch.exp(-d / (s * 2.0 ** (i - 2))) for i in range(5))
    return (k[:n, :n] + k[n:, n:] - k[:n, n:] - k[n:, :n]).mean()


def noise_mmd(a_rows: torch.Tensor, sample_of_row: torch.Tensor, position_of_row: torch.Tensor, B: int, T: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """MMD^2({masked a^i}_i, {masked noise^i}_i) for one layer.

    a_rows (M, dim): a_l at the harmful answer tokens only; sample_of_row, position_of_row: where each row sits in
    the (B, T) batch. Each sample i is a^i with every other position zeroed, flattened to T * dim; the noise
    sample i is N(0, I) at the same positions, zero elsewhere (as noise * mask)."""
    M, dim = a_rows.shape
    noise = torch.randn(M, dim, generator=generator, device=a_rows.device, dtype=torch.float32)
    flat = sample_of_row * T + position_of_row
    x = a_rows.new_zeros(B * T, dim, dtype=torch.float32).index_copy(0, flat, a_rows.float())
    y = noise.new_zeros(B * T, dim).index_copy(0, flat, noise)
    return mmd2(x.view(B, T * dim), y.view(B, T * dim))


def lens_ce(model, h_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logit lens (final norm + LM head on a hidden state) on the answer targets."""
    return F.cross_entropy(model.logits(h_rows).float(), targets)


def repnoise_terms(model, harmful: dict, generator: torch.Generator | None = None) -> dict:
    """H and MMD_noise on a harmful batch x_h, per layer and combined:
    - ce[j] = CE of lens(x_j) on the harmful answer tokens, j = 0..L (x_L: the final logits); H = 1 + mean_j ce[j];
    - mmd[l] = MMD^2(masked a_l, masked noise), l = 0..L-1, a_l = layer l's MLP output; MMD_noise = mean_l mmd[l].
    One forward records only the rows needed: the answer tokens (MMD mask) and the positions before them (lens)."""
    ids, mask, labels = harmful["input_ids"], harmful["attention_mask"], harmful["labels"]
    B, T = labels.shape
    is_answer, predicts = labels != -100, next_token_positions(labels)
    recorded = is_answer | predicts
    _, states = model.forward_hidden(ids, mask, record_at=recorded)
    # which recorded row (in (b, t) order) is an answer token, which one predicts one
    row_is_answer, row_predicts = is_answer[recorded], predicts[recorded]
    where = recorded.nonzero()
    sample_of_row, position_of_row = where[row_is_answer, 0], where[row_is_answer, 1]
    targets = answer_targets(labels)
    ce = torch.stack([grad_now(lambda h: lens_ce(model, h, targets), x[row_predicts]) for x in states["residual"]])
    mmd = torch.stack([grad_now(lambda a: noise_mmd(a, sample_of_row, position_of_row, B, T, generator),
                                a[row_is_answer]) for a in states["mlp"]])
    return {"ce": ce, "H": 1 + ce.mean(), "mmd": mmd, "mmd_noise": mmd.mean()}


def repnoise_step(model, batch: dict, harmful: dict, alpha: float, beta: float,
                  generator: torch.Generator | None = None) -> dict:
    """RepNoise: L = CE(x_s) + beta * MMD_noise(x_h) - alpha * log H(x_h); backward leaves the LoRA gradients.

    x_s: the safe alignment batch (D_a); x_h: a harmful batch drawn independently of it (D_h), as the paper's
    public code draws them (the RepNoise authors pair each harmful answer with a refusal to the same prompt)."""
    safe = sft_loss(model, batch)
    safe.backward()  # first, so its graph is freed before the harmful forward builds its own
    terms = repnoise_terms(model, harmful, generator)
    harm = beta * terms["mmd_noise"] - alpha * torch.log(terms["H"])
    harm.backward()
    return {"loss": safe.item() + harm.item(), "safe_ce": safe.item(), "harmful_ce": terms["ce"][-1].item(),
            "H": terms["H"].item(), "mmd_noise": terms["mmd_noise"].item()}


# ----------------------------------------------------------------------------------------------------------------
# TAR


def max_entropy_loss(model, batch: dict) -> torch.Tensor:
    """Minus the mean entropy of the next-token distribution where the harmful answer is predicted: minimising
    it pushes the (attacked) model toward uniform output on harmful answers (TAR's max-entropy loss)."""
    x, _ = model.forward_hidden(batch["input_ids"], batch["attention_mask"])
    logits = model.logits(x[:, :-1][batch["labels"][:, 1:] != -100]).float()
    logp = F.log_softmax(logits, dim=-1)
    return (logp.exp() * logp).sum(-1).mean()


def residual_l2(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE on the batch, mean over j = 0..L of the mean over real tokens of ||x_j - x_j(base)||_2), one forward.
    The base model is the same weights with the adapter disabled: no second copy of the model."""
    from lora import disable_lora
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.bool()
    with torch.no_grad(), disable_lora(model):
        _, base = model.forward_hidden(ids, mask, record_at=real)
    x, states = model.forward_hidden(ids, mask, record_at=real)
    l2 = torch.stack([grad_now(lambda h, b=b: (h.float() - b.float()).norm(dim=-1).mean(), h)
                      for h, b in zip(states["residual"], base["residual"])])
    return model.loss(x, batch["labels"]), l2.mean()


def tamper_schedule(inner_steps: int, every: int) -> dict[int, float]:
    """{k: w_k}: the inner steps after which the tamper-resistance loss is measured (every `every`-th, and the
    last), weighted in proportion to k (the later, the more attacked) and normalised to sum to 1."""
    ks = sorted({k for k in range(1, inner_steps + 1) if k % every == 0} | {inner_steps})
    return {k: k / sum(ks) for k in ks}


def tar_step(model, params: list, batch: dict, attack_batches: list, tamper_batch: dict, inner_lr: float,
             tr_every: int, tr_weight: float) -> dict:
    """TAR, first order. With theta the LoRA weights:
    1. K = len(attack_batches) inner steps of plain SFT on harmful pairs (AdamW, lr inner_lr, fresh state):
       theta -> theta'_1 .. theta'_K (the attacker of the attack stage, in miniature);
    2. after step k of `tamper_schedule`, g_TR += w_k * d TR(theta'_k) / d theta'_k, TR = max_entropy_loss on
       tamper_batch (no backprop through the inner updates);
    3. theta restored; retain loss R(theta) = CE(x_s) + mean_j ||x_j - x_j(base)||;
    4. the gradient left for the outer AdamW step: dR/dtheta + tr_weight * g_TR."""
    snapshot = [p.detach().clone() for p in params]  # LoRA only: the base weights never change
    inner = torch.optim.AdamW(params, lr=inner_lr, weight_decay=0.0)  # LoRA state only; dropped after this step
    schedule, g_tr = tamper_schedule(len(attack_batches), tr_every), [torch.zeros_like(p) for p in params]
    attack_losses, tamper_losses = [], []
    for k, attack in enumerate(attack_batches, start=1):
        loss = sft_loss(model, attack)
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        inner.step()
        attack_losses.append(loss.item())
        if k in schedule:
            tr = max_entropy_loss(model, tamper_batch)
            for acc, g in zip(g_tr, torch.autograd.grad(tr, params)):
                acc.add_(g, alpha=schedule[k])
            tamper_losses.append(tr.item())
    del inner
    with torch.no_grad():
        for p, saved in zip(params, snapshot):
            p.copy_(saved)
            p.grad = None
    ce, l2 = residual_l2(model, batch)
    (ce + l2).backward()
    for p, g in zip(params, g_tr):
        p.grad.add_(g, alpha=tr_weight)
    tr_mean = sum(w * t for w, t in zip(schedule.values(), tamper_losses))
    return {"loss": ce.item() + l2.item() + tr_weight * tr_mean, "retain_ce": ce.item(), "retain_l2": l2.item(),
            "tamper_loss": tr_mean, "attack_loss_first": attack_losses[0], "attack_loss_last": attack_losses[-1]}


# ----------------------------------------------------------------------------------------------------------------
# The step the training loop calls


class DefenceMethod:
    """One alignment step of `repnoise` or `tar` for trainer.train, with the harmful batches as its state."""

    def __init__(self, model, method: str, harmful_batches, *, alpha: float = 0.1, beta: float = 0.001,
                 inner_steps: int = 4, inner_lr: float = 1e-4, tr_every: int = 2, tr_weight: float = 4.0):
        from lora import lora_parameters
        if method not in ("repnoise", "tar"):
            raise ValueError(f"unknown defence {method!r}")
        self.model, self.method, self.harmful_batches = model, method, harmful_batches
        self.alpha, self.beta = alpha, beta
        self.inner_steps, self.inner_lr, self.tr_every, self.tr_weight = inner_steps, inner_lr, tr_every, tr_weight
        self.params = lora_parameters(model)

    def __call__(self, step: int, batch: dict) -> dict:
        device = batch["input_ids"].device
        if self.method == "repnoise":
            return repnoise_step(self.model, batch, self._harmful(device), self.alpha, self.beta)
        attacks = [self._harmful(device) for _ in range(self.inner_steps)]
        return tar_step(self.model, self.params, batch, attacks, self._harmful(device), self.inner_lr,
                        self.tr_every, self.tr_weight)

    def _harmful(self, device) -> dict:
        batch = next(iter(self.harmful_batches))  # Batches cycles through D_h epoch after epoch
        return {k: v.to(device) for k, v in batch.items()}

    def state_dict(self) -> dict:
        return {"harmful_batches": self.harmful_batches.state_dict()}

    def load_state_dict(self, state: dict):
        self.harmful_batches.load_state_dict(state["harmful_batches"])
