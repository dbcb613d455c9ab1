"""Pure tensor math shared by plugins.

Shapes: B = batch, T = sequence length, V = vocabulary size, R = response length. Masks are
0/1 (or bool) tensors broadcastable to the value tensor; a position with mask 0 never influences
a result, even when the value stored there is ``inf`` or ``nan`` (padding is often garbage).

The RL part (KL estimators, GAE, clipped losses, loss aggregation, group baselines) works on
(B, R) response-token tensors laid out right-padded: valid tokens of a row come first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "aggregate_loss",
    "clipped_policy_loss",
    "clipped_value_loss",
    "entropy_from_logits",
    "explained_variance",
    "float32_linear",
    "gae",
    "group_normalized_advantages",
    "kl_penalty",
    "leave_one_out_baseline",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "returns_to_go",
    "whiten_advantages",
]


def float32_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` in float32 whatever the autocast state: (..., out) float32.

    Args:
        x: (..., in) hidden states, any floating dtype.
        weight: (out, in); ``bias``: (out,) or None.

    The LM head of every path that yields log-probs or sampling logits. Under bf16 / fp16
    autocast ``F.linear`` runs in half precision even for float32 weights and rounds its
    output to it (bf16 keeps 8 significant bits: at |logit| ~ 10 an error of up to 0.03 in
    every log-prob, in the sampled distribution and in the importance ratio). Here autocast
    is off and both operands are float32, so the logits carry only the rounding already in
    ``x``. With float32 operands and autocast off (the CPU default) this is exactly
    ``F.linear``.
    """
    device_type = x.device.type
    # Devices autocast does not know (meta) cannot be in an autocast region.
    if not (
        torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    ):
        return _linear32(x, weight, bias)
    with torch.autocast(device_type, enabled=False):
        return _linear32(x, weight, bias)


def _linear32(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # .float() returns float32 tensors themselves, so the float32 case copies nothing.
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def _scaled_float_logits(logits: Tensor, temperature: float) -> Tensor:
    """Upcast to float32 (bf16/fp16 log-softmax is too coarse for RL ratios) and apply 1/τ.

    Upcasting cannot restore bits the logits lost in a half-precision head: produce them
    with :func:`float32_linear`. Nothing after this point is downcast by autocast (gather,
    ``logsumexp`` and ``log_softmax`` keep float32 inputs in float32).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float()
    # Skip the division at τ=1 so float32 inputs are not copied a second time.
    return logits if temperature == 1.0 else logits / temperature


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``.

    Args:
        logits: (B, T, V) unnormalised scores.
        labels: (B, T) token ids to score.
        temperature: softmax temperature τ > 0.

    Returns:
        (B, T) float32 tensor ``z[label] - logsumexp(z)`` with ``z = logits / τ``.

    Only the gathered logit and the log-partition are kept, so no second (B, T, V) tensor of
    log-probabilities is materialised.
    """
    z = _scaled_float_logits(logits, temperature)
    picked = z.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits / temperature)`` at every position.

    Args:
        logits: (B, T, V).

    Returns:
        (B, T) float32 ``H = -Σ_v p_v log p_v``, with ``0 log 0 = 0``: logits masked to ``-inf``
        (e.g. by top-k filtering) contribute nothing instead of nan.

    ``p log p`` from ``log_softmax`` and its ``exp`` rather than ``torch.special.entr(softmax)``:
    the same values to float rounding, at a third of the time on the CPU (``entr`` takes the
    logarithm element by element; at 16 x 32 x 789 it was 1.8 against 0.5 ms).
    """
    logp = torch.log_softmax(_scaled_float_logits(logits, temperature), dim=-1)
    # exp(-inf) = 0; clamping -inf to the lowest float keeps 0 * log 0 at 0, not nan.
    return -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(dim=-1)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is non-zero (weighted by ``mask``).

    ``torch.where`` (not ``x * mask``) is used so that ``inf``/``nan`` at masked positions cannot
    leak in through ``0 * inf = nan``.
    """
    if mask.dtype == torch.bool:
        values = torch.where(mask, x, 0.0)
    else:
        values = torch.where(mask != 0, x * mask, 0.0)
    return values.sum() if dim is None else values.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over valid positions; 0 where there are none (instead of ``nan``)."""
    weight = mask.to(x.dtype)
    count = weight.sum() if dim is None else weight.sum(dim=dim)
    # clamp instead of branching: no host sync, and an empty selection yields 0 / 1 = 0.
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all valid positions (a scalar).

    With ``unbiased=True`` Bessel's correction ``n / (n - 1)`` is applied, ``n`` being the number
    of valid positions; for ``n <= 1`` the (zero) biased variance is returned.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to unit variance (and zero mean) using statistics of valid positions only.

    This is the advantage/reward whitening used by PPO for language models (Ziegler et al., 2019,
    "Fine-Tuning Language Models from Human Preferences"): padding must not contribute to the
    statistics, or batches with more padding would be scaled differently.

    Args:
        x: values of any shape, e.g. (B, R) advantages.
        mask: same shape; 1 for valid positions.
        shift_mean: if False, the valid mean is added back so only the scale changes
            (useful for rewards, whose sign carries information).
        eps: added to the variance before the square root.

    Returns:
        Tensor shaped like ``x``; positions with mask 0 are set to 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)


# --------------------------------------------------------------------------------------------
# KL to the reference policy
# --------------------------------------------------------------------------------------------


def _k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: Tensor) -> Tensor:
    # exp(-x) - 1 + x with x = logp - ref_logp, i.e. r - 1 - log r for r = ref / pi.
    return torch.expm1(-log_ratio) + log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}
"""Per-token estimators of KL(pi || ref) from ``log_ratio = log pi - log ref``."""


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || ref) at tokens sampled from pi (Schulman, 2020).

    With ``r = ref(y) / pi(y)`` evaluated at the sampled token y ~ pi:

    * ``k1 = -log r = logp - ref_logp``: unbiased, high variance, can be negative;
    * ``k2 = (log r)^2 / 2``: biased, low variance, always >= 0;
    * ``k3 = (r - 1) - log r``: unbiased, low variance, always >= 0 (the GRPO penalty,
      Shao et al. 2024 eq. 4).

    Args:
        logp: (B, R) log-probs under the policy pi.
        ref_logp: (B, R) log-probs of the same tokens under the reference.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        (B, R) per-token estimates (mask them yourself; padding values are meaningless).
    """
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; expected one of {sorted(KL_ESTIMATORS)}"
        ) from None
    return fn(logp - ref_logp)


# --------------------------------------------------------------------------------------------
# Rewards, returns and advantages
# --------------------------------------------------------------------------------------------


def _last_valid_index(mask: Tensor) -> Tensor:
    """(B, R) mask -> (B,) column of the last valid token (0 for an empty row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return ((mask != 0).long() * positions).argmax(dim=-1)


def per_token_rewards(seq_rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """KL-shaped per-token rewards (Ziegler et al. 2019 eq. 2, spread over tokens).

    ``r_t = -kl_coef * kl_t`` on every response token, plus the sequence score on the last
    real response token (the EOS when there is one, the last sampled token otherwise)::

        r_t = [t == last] * score - kl_coef * kl_t

    Args:
        seq_rewards: (B,) sequence scores.
        kl: (B, R) per-token KL estimates (see :func:`kl_penalty`).
        mask: (B, R) response mask.
        kl_coef: the KL coefficient beta.

    Returns:
        (B, R) float rewards, 0 at padding.
    """
    valid = mask != 0
    rewards = torch.where(valid, -kl_coef * kl, 0.0).to(seq_rewards.dtype)
    last = _last_valid_index(mask)
    return rewards.scatter_add(1, last[:, None], seq_rewards[:, None].to(rewards.dtype))


def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016, eq. 16).

    ::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = sum_l (gamma * lam)^l * delta_{t+l} = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                     (the value target)

    ``V_t`` is the value of the state before token t is emitted. The last valid token of a
    row bootstraps with 0 (the episode ends there), and padding never contributes: values and
    rewards at masked positions are ignored.

    Args:
        token_rewards: (B, R) per-token rewards (see :func:`per_token_rewards`).
        values: (B, R) value estimates.
        mask: (B, R) response mask, right-padded.
        gamma: discount; lam: the GAE lambda.

    Returns:
        ``(advantages, returns)``, both (B, R) and 0 at padding.
    """
    valid = mask != 0
    rewards = torch.where(valid, token_rewards, 0.0)
    values = torch.where(valid, values, 0.0)
    keep = valid.to(rewards.dtype)
    length = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        # A next token that is padding means the episode ended at t: bootstrap with 0.
        next_keep = keep[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_keep * next_value - values[:, t]
        running = delta + gamma * lam * next_keep * running
        advantages[:, t] = running
    advantages = torch.where(valid, advantages, 0.0)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def returns_to_go(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Discounted return from each token, ``G_t = sum_{s >= t} gamma^(s-t) r_s`` (B, R).

    The REINFORCE++ return (Hu 2025): GAE with ``V = 0`` and ``lambda = 1``.
    """
    advantages, _ = gae(token_rewards, torch.zeros_like(token_rewards), mask, gamma, 1.0)
    return advantages


def whiten_advantages(
    advantages: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Advantages normalised to zero mean, unit variance over valid tokens only (B, R).

    Statistics come from every valid token of the batch (Huang et al. 2024, "The N
    implementation details of RLHF with PPO"); padding gets 0.
    """
    return masked_whiten(advantages, mask, shift_mean=shift_mean, eps=eps)


def _group_index(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) group ids -> (B,) dense group index and (G,) group sizes (rows need not be sorted)."""
    _, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return index, counts


def _group_sum(x: Tensor, index: Tensor, groups: int) -> Tensor:
    return torch.zeros(groups, dtype=x.dtype, device=x.device).index_add_(0, index, x)


def group_normalized_advantages(
    rewards: Tensor, group_ids: Tensor, scale: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, eq. 3 and Sec. 4.1.2).

    ::

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    with the mean and (unbiased) standard deviation over the rows sharing ``group_ids[i]``.
    ``scale=False`` keeps only the centring (Liu et al. 2025, "Dr. GRPO"), which does not
    up-weight groups whose rewards barely differ. A group of one row gets advantage 0.

    Args:
        rewards: (B,) sequence rewards.
        group_ids: (B,) prompt index of each row.

    Returns:
        (B,) advantages.
    """
    index, counts = _group_index(group_ids)
    n = counts.to(rewards.dtype)
    mean = _group_sum(rewards, index, len(counts)) / n
    centred = rewards - mean[index]
    if not scale:
        return centred
    var = _group_sum(centred.square(), index, len(counts)) / (n - 1).clamp(min=1)
    return centred / (var.sqrt()[index] + eps)


def leave_one_out_baseline(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """RLOO baseline: the mean reward of the *other* samples of the same prompt.

    Ahmadian et al. 2024, eq. 7: with k samples per prompt the advantage of sample i is
    ``r_i - 1/(k-1) * sum_{j != i} r_j``; this returns the subtracted term::

        b_i = (sum_group(r) - r_i) / (k - 1)

    Args:
        rewards: (B,) sequence rewards.
        group_ids: (B,) prompt index of each row; every group needs at least 2 rows.

    Returns:
        (B,) baselines.
    """
    index, counts = _group_index(group_ids)
    if bool((counts < 2).any()):
        raise ValueError("a leave-one-out baseline needs at least 2 samples per prompt")
    total = _group_sum(rewards, index, len(counts))
    return (total[index] - rewards) / (counts[index].to(rewards.dtype) - 1)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate, per token (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ::

        rho_t = exp(logp_t - old_logp_t)
        L_t   = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high))

    ``clip_eps_high`` (default: ``clip_eps``) allows an asymmetric range ("clip-higher",
    Yu et al. 2025). At ``rho = 1`` the gradient is the REINFORCE gradient ``-A * grad logp``.

    Args:
        logp: (B, R) log-probs under the policy being optimised (with grad).
        old_logp: (B, R) log-probs under the policy that sampled the tokens.
        advantages: (B, R).
        mask: (B, R) response mask.

    Returns:
        ``(per_token_loss, clipfrac)``: (B, R) loss, 0 at padding, and the scalar fraction of
        valid tokens where the clipped term is the active one (its gradient is 0).
    """
    valid = mask != 0
    high = clip_eps if clip_eps_high is None else clip_eps_high
    # Mask the log-ratio before exp: garbage at padding could overflow to inf, and the
    # backward of exp would then turn the zero gradient into 0 * inf = nan.
    ratio = torch.exp(torch.where(valid, logp - old_logp, 0.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    per_token = torch.where(valid, torch.maximum(unclipped, clipped), 0.0)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return per_token, clipfrac


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss, per token, as in PPO's reference implementation (Huang et al.
    2024).

    ::

        V_clip = old_V + clip(V - old_V, -c, c)
        L_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)

    Args:
        values: (B, R) current value predictions (with grad).
        old_values: (B, R) predictions at rollout time.
        returns: (B, R) value targets.
        mask: (B, R) response mask.
        clip: c, in value units.

    Returns:
        ``(per_token_loss, clipfrac)``: (B, R), 0 at padding, and the fraction of valid tokens
        where the clipped error is the larger one.
    """
    valid = mask != 0
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_sq = (values - returns).square()
    clipped_sq = (clipped_values - returns).square()
    per_token = torch.where(valid, 0.5 * torch.maximum(unclipped_sq, clipped_sq), 0.0)
    clipfrac = masked_mean((clipped_sq > unclipped_sq).float(), mask)
    return per_token, clipfrac


def _count(value: float | Tensor | None, default: Tensor) -> Tensor:
    """A normaliser: ``value`` if given, else ``default``; at least 1 so empty inputs give 0."""
    if value is not None:
        default = torch.as_tensor(value, dtype=default.dtype, device=default.device)
    return default.clamp(min=1)


def _token_mean(
    per_token: Tensor, mask: Tensor, tokens: Tensor, seqs: Tensor, length: int
) -> Tensor:
    return masked_sum(per_token, mask) / tokens


def _seq_mean_token_mean(
    per_token: Tensor, mask: Tensor, tokens: Tensor, seqs: Tensor, length: int
) -> Tensor:
    # A row's own length is local to the row, so only the sequence count must be global.
    seq_means = masked_sum(per_token, mask, dim=-1) / mask.to(per_token.dtype).sum(-1).clamp(min=1)
    return seq_means.sum() / seqs


def _seq_mean_token_sum_norm(
    per_token: Tensor, mask: Tensor, tokens: Tensor, seqs: Tensor, length: int
) -> Tensor:
    return masked_sum(per_token, mask) / (seqs * length)


LOSS_AGGREGATIONS: dict[str, Callable[..., Tensor]] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}
"""Ways to reduce a (B, R) per-token loss to a scalar; see :func:`aggregate_loss`."""


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    *,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar, correctly under gradient accumulation.

    With ``l`` the per-token loss, ``m`` the mask, ``|y_i|`` the length of row i, N the
    number of valid tokens, S the number of rows and L a fixed length:

    * ``token_mean``: ``sum_{i,t} m l / N`` - every token weighs the same (DAPO);
    * ``seq_mean_token_mean``: ``1/S sum_i (sum_t m l / |y_i|)`` - every sequence weighs
      the same (GRPO, Shao et al. 2024 eq. 3);
    * ``seq_mean_token_sum_norm``: ``sum_{i,t} m l / (S * L)`` - a constant normaliser, so
      long and short responses are not re-weighted (Dr. GRPO, Liu et al. 2025).

    Under gradient accumulation a minibatch is split into micro-batches whose losses are
    summed. Pass the *global* counts of the whole minibatch (``num_tokens`` = N,
    ``num_seqs`` = S) and the sum over micro-batches equals the loss of the full minibatch;
    a per-micro-batch mean would instead over-weight the tokens of short micro-batches.

    Args:
        per_token: (B, R) loss per token.
        mask: (B, R) response mask.
        mode: one of :data:`LOSS_AGGREGATIONS`.
        num_tokens: N; default: the valid tokens of this call.
        num_seqs: S; default: B.
        max_len: L; default: R.

    Returns:
        A scalar tensor.
    """
    try:
        fn = LOSS_AGGREGATIONS[mode]
    except KeyError:
        raise ValueError(
            f"unknown loss aggregation {mode!r}; expected one of {sorted(LOSS_AGGREGATIONS)}"
        ) from None
    tokens = _count(num_tokens, mask.to(per_token.dtype).sum())
    seqs = _count(num_seqs, per_token.new_tensor(float(per_token.shape[0])))
    length = per_token.shape[-1] if max_len is None else int(max_len)
    return fn(per_token, mask, tokens, seqs, length)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over valid tokens: 1 is a perfect critic, <= 0 a useless one.

    Returns a scalar tensor; ``nan`` when the returns have no variance.
    """
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(returns - values, mask)
    return torch.where(var_returns > 0, 1 - var_residual / var_returns, torch.nan)
