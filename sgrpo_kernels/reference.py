"""The loss in plain PyTorch (``docs/design.md``, "The loss"): the specification every backend is tested against.

Readable next to the formulas, vectorised (no Python loop over tokens: sentences are reduced with
``index_add``), and exact in float64, which is how the tests use it as gold. It materialises
``log_softmax(logits)`` and is therefore neither fast nor light: that is the kernels' job.
"""

from __future__ import annotations

import math

import torch

from .config import LossConfig
from .distributed import gather_rows, global_sum, world_size


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False):
    """``log_softmax(logits / temperature)[ids]`` and optionally the entropy of that distribution.

    logits: ``[..., V]`` float; ids: ``[...]`` int64 in ``[0, V)``.
    Returns logp ``[...]`` in the dtype of ``logits`` (and entropy ``[...]`` when asked).
    """
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    logp = log_probs.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    # p · log p is taken as 0 where p = 0, so a logit of -inf turns neither H nor its gradient into NaN.
    probs = log_probs.exp()
    entropy = -(probs * torch.where(probs > 0, log_probs, 0.0)).sum(-1)
    return logp, entropy


def sentence_grpo_loss(logits: torch.Tensor, completion_ids: torch.Tensor, segment_ids: torch.Tensor,
                       advantages: torch.Tensor, old_logps: torch.Tensor | None = None,
                       ref_logps: torch.Tensor | None = None, config: LossConfig = LossConfig(),
                       return_metrics: bool = False, process_group=None, normalizer=None, is_weights=None,
                       sampling_logps=None):
    """Sentence-level GRPO loss (``docs/design.md``, "The loss").

    logits ``[B, T, V]``; completion_ids ``[B, T]`` int; segment_ids ``[B, T]`` int (``-1`` = unscored);
    advantages ``[B, S_max]`` or ``[B]``; old_logps, ref_logps ``[B, T]`` or ``None``.
    Inputs are assumed valid (the public API checks them). The log-probs are computed in the dtype
    of ``logits``; everything after them in at least float32 (float64 when the logits are).
    Returns the scalar loss, and with ``return_metrics`` also a dict of detached 0-dim tensors.
    With a ``process_group`` this rank's rows are part of a global batch: the denominators ``B'`` and ``Σ n``
    are summed over the ranks and the loss is multiplied by the world size (``sgrpo_kernels.distributed``).
    ``normalizer`` (a number or 0-dim tensor) replaces the reduction's denominator (``B'``, ``Σ n`` or 1).
    ``is_weights`` (``[B]`` or ``[B, T]``, constant) multiply each token's policy loss, not its KL term
    (importance weights of the rollout engine: TRL's vLLM correction, Liger's ``vllm_is_ratio``).
    ``sampling_logps`` (``[B, T]``): the rollout engine's log-probs, for the off-policy mask (else ``old_logps``).
    """
    scored = segment_ids >= 0                                             # [B, T]
    logp = token_logprobs(logits[scored], completion_ids[scored], config.temperature)  # [M]

    def entropy_of_scored():                                              # [M], with gradient
        return token_logprobs(logits[scored], completion_ids[scored], config.temperature, return_entropy=True)[1]

    return _loss_from_scored_logps(logp, entropy_of_scored, segment_ids, advantages, old_logps, ref_logps, config,
                                   return_metrics, process_group, normalizer, is_weights, sampling_logps)


def sentence_grpo_loss_from_logps(logps: torch.Tensor, segment_ids: torch.Tensor, advantages: torch.Tensor,
                                  old_logps: torch.Tensor | None = None, ref_logps: torch.Tensor | None = None,
                                  config: LossConfig = LossConfig(), return_metrics: bool = False,
                                  process_group=None, normalizer=None, is_weights=None, sampling_logps=None,
                                  entropy: torch.Tensor | None = None):
    """:func:`sentence_grpo_loss` for a trainer that already has the token log-probs (verl's policy losses).

    logps ``[B, T]`` float, the log-probs of the sampled tokens at temperature ``config.temperature`` (gradient
    flows into them); entropy ``[B, T]`` or ``None``, the token entropies, needed only by ``entropy_coef`` and
    ``top_entropy_quantile`` (gradient flows into it for the bonus) and reported as ``entropy_mean`` when given.
    Everything else as :func:`sentence_grpo_loss`; with the log-probs of ``logits`` it returns the same loss.
    """
    scored = segment_ids >= 0

    def entropy_of_scored():
        if entropy is None:
            raise ValueError("entropy_coef and top_entropy_quantile need the token entropies: pass entropy=[B, T]")
        return entropy[scored]

    return _loss_from_scored_logps(logps[scored], entropy_of_scored, segment_ids, advantages, old_logps, ref_logps,
                                   config, return_metrics, process_group, normalizer, is_weights, sampling_logps,
                                   entropy_known=entropy is not None)


def _loss_from_scored_logps(logp, entropy_of_scored, segment_ids, advantages, old_logps, ref_logps, config,
                            return_metrics, process_group, normalizer, is_weights, sampling_logps,
                            entropy_known=True):
    """The loss from the log-probs ``logp [M]`` of the scored tokens (row-major order); ``entropy_of_scored()``
    gives their entropies ``[M]`` with gradient (``entropy_known=False``: it raises, and no ``entropy_mean``)."""
    batch, length = segment_ids.shape
    device = segment_ids.device
    scored = segment_ids >= 0                                             # [B, T]
    rows = torch.arange(batch, device=device).unsqueeze(1).expand(batch, length)[scored]  # [M]
    segments = segment_ids[scored].long()                                 # [M]
    if advantages.dim() == 2:
        num_slots = advantages.shape[1]
    else:
        num_slots = int(segments.max()) + 1 if segments.numel() else 1
    sentence_of_token = rows * num_slots + segments                       # [M], in [0, B * num_slots)

    work_dtype = torch.promote_types(logp.dtype, torch.float32)
    logp = logp.to(work_dtype)
    old = logp.detach() if old_logps is None else old_logps[scored].to(work_dtype)

    def per_sentence_sum(token_values):                                  # [M] -> [B * num_slots]
        zeros = torch.zeros(batch * num_slots, dtype=work_dtype, device=device)
        return zeros.index_add(0, sentence_of_token, token_values)

    tokens_per_sentence = per_sentence_sum(torch.ones_like(logp))        # n(i, s)
    exists = tokens_per_sentence > 0
    divisor = tokens_per_sentence.clamp(min=1)

    # log ρ = Σ Δ_t (or its mean), clamped
    log_ratio_sum = per_sentence_sum(logp - old)
    log_ratio = log_ratio_sum
    if config.ratio_level == "mean":
        log_ratio = log_ratio / divisor
    log_ratio = log_ratio.clamp(-config.clamp_log_ratio, config.clamp_log_ratio)
    ratio = torch.exp(log_ratio)

    if advantages.dim() == 2:
        sentence_advantage = advantages.reshape(-1).to(work_dtype)
    else:
        sentence_advantage = advantages.to(work_dtype).repeat_interleave(num_slots)
    sentence_advantage = torch.where(exists, sentence_advantage, 0.0)
    # L(i, s) = the mean over the sentence's tokens of the objective's per-token loss (constant over the sentence
    # for ppo_clip and sapo), plus the KL term
    # with token weights q_t (is_weights and the masks): the mean over the sentence of q_t · ℓ_t
    token_advantage = sentence_advantage[sentence_of_token]
    entropy_mask, token_weight, token_log_is = policy_token_weights(
        config, logp.detach(), lambda: entropy_of_scored().detach().to(work_dtype),
        None if sampling_logps is None else sampling_logps[scored].to(work_dtype),
        old if old_logps is not None else None, token_advantage, sentence_of_token, batch * num_slots,
        None if is_weights is None else token_weights(is_weights, scored).to(work_dtype), process_group,
        answer_of_token=rows, answers=batch)
    clipped_tokens = None
    if config.objective in ("cispo", "vespo"):     # −sg(weight) · Â · mean_t q_t logp_t
        if config.objective == "cispo":
            weight = ratio.clamp(max=config.eps_high)
        else:
            log_is = None if token_log_is is None else per_sentence_sum(token_log_is)
            weight = vespo_weight(log_ratio_sum, log_is, sentence_advantage, config)
        weighted_logp = logp if token_weight is None else token_weight * logp
        sentence_loss = -weight.detach() * sentence_advantage * per_sentence_sum(weighted_logp) / divisor
    elif config.objective == "geo_mean":
        # GMPO: each token's log-ratio clipped on the side the advantage's sign makes harmful, then aggregated
        token_delta = logp - old
        sign = torch.sign(token_advantage)
        clipped_delta = token_delta.clamp(-config.eps_low, config.eps_high)
        kept = sign * torch.minimum(sign * token_delta, sign * clipped_delta)
        clipped_tokens = per_sentence_sum(((kept != token_delta) & (sign != 0)).to(work_dtype))
        geo_log_ratio = per_sentence_sum(kept)
        if config.ratio_level == "mean":
            geo_log_ratio = geo_log_ratio / divisor
        geo_ratio = torch.exp(geo_log_ratio.clamp(-config.clamp_log_ratio, config.clamp_log_ratio))
        sentence_loss = -sentence_advantage * geo_ratio
        if token_weight is not None:
            sentence_loss = sentence_loss * per_sentence_sum(token_weight) / divisor
    else:
        sentence_loss = -policy_surrogate(ratio, sentence_advantage, config)
        if token_weight is not None:
            sentence_loss = sentence_loss * per_sentence_sum(token_weight) / divisor

    if config.beta > 0:
        token_kl = kl_estimate(ref_logps[scored].to(work_dtype) - logp, config.kl_estimator)
        sentence_kl = per_sentence_sum(token_kl)
        if config.kl_reduction == "mean":
            sentence_kl = sentence_kl / divisor
        if config.kl_importance_weighting:
            sentence_kl = sentence_kl * ratio
        sentence_loss = sentence_loss + config.beta * sentence_kl
    sentence_loss = torch.where(exists, sentence_loss, 0.0)

    def denominator(local):
        if normalizer is not None:
            return torch.as_tensor(normalizer, dtype=work_dtype, device=device)
        return global_sum(local, process_group).clamp(min=1)

    if config.reduction == "sum":
        loss = sentence_loss.sum() / (1 if normalizer is None else denominator(None))
    elif config.reduction == "token_mean":
        loss = (tokens_per_sentence * sentence_loss).sum() / denominator(tokens_per_sentence.sum())
    else:  # sentence_mean: (1/B') Σ_i (1/S_i) Σ_s L(i, s); answer_mean_sentence_sum: (1/B') Σ_i Σ_s L(i, s);
        # answer_mean_token_sum: (1/B') Σ_i Σ_s n(i, s) L(i, s)
        sentences_per_row = exists.view(batch, num_slots).sum(1)
        if config.reduction == "answer_mean_token_sum":
            sentence_loss = tokens_per_sentence * sentence_loss
        row_loss = sentence_loss.view(batch, num_slots).sum(1)
        if config.reduction == "sentence_mean":
            row_loss = row_loss / sentences_per_row.clamp(min=1)
        loss = row_loss.sum() / denominator((sentences_per_row > 0).sum())
    if config.entropy_coef != 0:    # − c · mean token entropy, over the (entropy-masked) scored tokens of every rank
        token_entropy = entropy_of_scored()
        bonus_tokens = torch.ones_like(logp, dtype=torch.bool) if entropy_mask is None else entropy_mask
        tokens = global_sum(bonus_tokens.sum(), process_group).clamp(min=1)
        loss = loss - config.entropy_coef * torch.where(bonus_tokens, token_entropy.to(work_dtype), 0.0).sum() / tokens
    loss = loss * world_size(process_group)

    if not return_metrics:
        return loss
    with torch.no_grad():
        num_sentences = exists.sum()
        clipped = clipped_sentences(ratio, sentence_advantage, config, clipped_tokens)
        metrics = {
            "clip_fraction": (clipped & exists).sum() / num_sentences.clamp(min=1),
            "ratio_mean": torch.where(exists, ratio, 0.0).sum() / num_sentences.clamp(min=1),
            "num_sentences": num_sentences,
            "num_tokens": scored.sum(),
        }
        if config.beta > 0:
            metrics["kl_mean"] = token_kl.sum() / max(token_kl.numel(), 1)
        if entropy_known:
            entropy = entropy_of_scored()
            metrics["entropy_mean"] = entropy.to(work_dtype).sum() / max(entropy.numel(), 1)
    return loss, metrics


def rollout_weights(config: LossConfig, old_logps, sampling_logps, sentence_of_token, total_slots: int,
                    answer_of_token, answers: int, sequence_total=None):
    """``is_mode``'s importance weights ``[M]``: ``exp(old − sampling)`` per token, or of its sum over the token's
    sentence or answer (TRL sums over the sequence), truncated to ``[is_clip_min, is_clip_max]`` or set to 0
    outside it. Tokens whose rollout log-prob is NaN count as ratio 1 (TRL's rule). ``sequence_total`` (or
    ``None``) sums the per-sentence or per-answer sums over the ranks that hold parts of the sequence."""
    difference = torch.nan_to_num(old_logps - sampling_logps, nan=0.0)
    level = config.is_mode.split("_")[0]
    if level != "token":
        groups, count = ((sentence_of_token, total_slots) if level == "sentence" else (answer_of_token, answers))
        sums = torch.zeros(count, dtype=difference.dtype, device=difference.device).index_add(0, groups, difference)
        difference = (sums if sequence_total is None else sequence_total(sums))[groups]
    ratio = torch.exp(difference)
    low = -math.inf if config.is_clip_min is None else config.is_clip_min
    high = math.inf if config.is_clip_max is None else config.is_clip_max
    if config.is_mode.endswith("truncate"):
        return ratio.clamp(low, high)
    return torch.where((ratio < low) | (ratio > high), 0.0, ratio)


def policy_token_weights(config: LossConfig, logp, entropy_of, sampling_logps, old_logps, token_advantage,
                         sentence_of_token, total_slots: int, is_weights, process_group=None, answer_of_token=None,
                         answers: int = 0, sequence_total=None):
    """The top-entropy mask (``[M]`` bool, or ``None``), the constant weights ``q_t`` of each scored token's policy
    loss (``[M]``, or ``None`` when all are 1): ``is_weights`` (or ``is_mode``'s weights) × the top-entropy
    mask × the off-policy mask, and ``None``; except for ``vespo``, whose importance weights are not a factor
    of ``q_t`` but enter its sentence weight ``w``: then the third value is their log ``[M]`` (clamped to
    ``[log 1e-8, clamp_log_ratio]``, TRL's bounds), or ``None`` without importance weights.

    ``logp`` ``[M]`` (detached), ``entropy_of()`` gives the ``[M]`` entropies (called only when needed),
    ``sampling_logps``/``old_logps`` ``[M]`` or ``None``, ``token_advantage`` ``[M]`` (its sentence's ``Â``),
    ``sentence_of_token`` ``[M]`` slot indices in ``[0, total_slots)``. The entropy quantile is taken over the
    scored tokens of every rank of ``process_group``. ``answer_of_token`` ``[M]`` (its row) for the sequence modes.
    ``sequence_total`` (``None``: none) sums per-sentence and per-answer sums over the ranks that share a sequence
    (``sp_group``); the driver passes it, the tests' one-process statement never does.
    """
    weight = is_weights
    if config.is_mode is not None:
        weight = rollout_weights(config, old_logps, sampling_logps, sentence_of_token, total_slots, answer_of_token,
                                 answers, sequence_total)
    log_is = None
    if config.objective == "vespo" and weight is not None:
        log_is = torch.log(weight).clamp(VESPO_MIN_LOG_WEIGHT, config.clamp_log_ratio)
        weight = None
    entropy_mask = None
    if config.top_entropy_quantile < 1.0:
        entropy = entropy_of().detach()
        everyone = entropy if process_group is None else gather_rows(entropy, process_group)[0]
        if everyone.numel():
            threshold = torch.quantile(everyone.double(), 1.0 - config.top_entropy_quantile).to(entropy.dtype)
            entropy_mask = entropy >= threshold
        else:
            entropy_mask = torch.zeros_like(entropy, dtype=torch.bool)
        weight = entropy_mask.to(logp.dtype) if weight is None else weight * entropy_mask
    if config.off_policy_mask_threshold is not None:
        behaviour = sampling_logps if sampling_logps is not None else old_logps if old_logps is not None else logp
        drift = torch.nan_to_num(behaviour - logp, nan=0.0)          # log π_sampling − log π, per token
        sums = torch.zeros(total_slots, dtype=logp.dtype, device=logp.device).index_add(0, sentence_of_token, drift)
        counts = torch.zeros(total_slots, dtype=logp.dtype, device=logp.device).index_add(
            0, sentence_of_token, torch.ones_like(drift))
        if sequence_total is not None:
            sums, counts = sequence_total(sums), sequence_total(counts)
        mean_drift = (sums / counts.clamp(min=1))[sentence_of_token]
        keep = ((token_advantage >= 0) | (mean_drift <= config.off_policy_mask_threshold)).to(logp.dtype)
        weight = keep if weight is None else weight * keep
    return entropy_mask, weight, log_is


def token_weights(is_weights: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """The constant weight of each scored token (``[M]``) from ``[B]`` (one per answer) or ``[B, T]`` weights."""
    if is_weights.dim() == 1:
        is_weights = is_weights.unsqueeze(1).expand(scored.shape)
    return is_weights[scored].detach()


def policy_surrogate(ratio: torch.Tensor, advantage: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """The per-token policy term of ``ppo_clip`` or ``sapo`` (minus the loss), from the sentence's ratio ``ρ`` and
    advantage ``Â`` (any shape)."""
    if config.objective == "sapo":       # soft gate: 4/τ · σ(τ(ρ − 1)), τ by the sign of Â
        # τ in the dtype of Â (a where() of two Python floats would round them to float32)
        tau = torch.where(advantage > 0, torch.full_like(advantage, config.sapo_tau_pos),
                          torch.full_like(advantage, config.sapo_tau_neg))
        return torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantage
    # min(ρ_u · Â, clip(ρ) · Â) with ρ_u = min(ρ, delta); dual clip: where Â < 0, at least clip_ratio_c · Â
    unclipped_ratio = ratio if config.delta is None else ratio.clamp(max=config.delta)
    clipped_ratio = ratio.clamp(1 - config.eps_low, 1 + config.eps_high)
    surrogate = torch.minimum(unclipped_ratio * advantage, clipped_ratio * advantage)
    if config.clip_ratio_c is not None:
        surrogate = torch.where(advantage < 0, torch.maximum(surrogate, config.clip_ratio_c * advantage), surrogate)
    return surrogate


VESPO_MIN_LOG_WEIGHT = math.log(1e-8)    # TRL's lower bound of VESPO's log w


def vespo_weight(log_ratio: torch.Tensor, log_is: torch.Tensor | None, advantage: torch.Tensor,
                 config: LossConfig) -> torch.Tensor:
    """VESPO's gamma weight ``φ(w) = exp(λ + k log w − λ w)`` (``φ(1) = 1``) of each sentence (any shape), with
    ``log w = Σ_t Δ_t (+ Σ_t log q_t`` of the importance weights) over the sentence's tokens, always the sum
    (VESPO's weight is the product of the token ratios; ``ratio_level`` shapes ``ρ`` only), clamped to
    ``[log 1e-8, clamp_log_ratio]``, and ``(k, λ)`` by the sign of ``Â`` (``Â >= 0``: the ``_pos`` pair).
    Not finite → 0, as in TRL."""
    log_w = log_ratio if log_is is None else log_ratio + log_is
    log_w = log_w.clamp(VESPO_MIN_LOG_WEIGHT, config.clamp_log_ratio)
    positive = advantage >= 0
    k = torch.where(positive, torch.full_like(log_w, config.vespo_k_pos), torch.full_like(log_w, config.vespo_k_neg))
    lam = torch.where(positive, torch.full_like(log_w, config.vespo_lambda_pos),
                      torch.full_like(log_w, config.vespo_lambda_neg))
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


# The Taylor coefficients 1/k! (k = 2 .. 17) of k3 = e^x − x − 1 = x² Σ_{j≥0} x^j / (j + 2)!; below |x| = 1/2 the
# first term left out is under 1e-20 of the sum, far below fp64 rounding.
K3_SERIES_COEFFICIENTS = tuple(1 / math.factorial(k) for k in range(2, 18))


def k3(x: torch.Tensor) -> torch.Tensor:
    """DeepSeekMath's ``k3 = e^x − x − 1``, accurate to a few ulps in every float dtype.

    Written as it reads, it cancels catastrophically near 0, where k3 ≈ x²/2 lies far below the rounding of
    ``e^x ≈ 1``: in fp32 it is tens of percent off at |x| = 1e-3 and gives 0 or ±1.2e-7 for 5.0e-9 at 1e-4;
    ``expm1(x) − x`` still loses the digits of ``expm1``'s rounding of ``x`` (0.07 % at 1e-4 in fp32). So below
    |x| = 1/2 it is the Taylor series in Horner form, ``x² (1/2! + x (1/3! + x (… + x/17!)))`` (the Triton and C++
    kernels use the same series), and ``expm1(x) − x`` beyond, where the cancellation costs at most a few ulps.
    Autograd's slope of the series is accurate too, as ``e^x − 1`` is.
    """
    small = x.abs() < 0.5
    near_zero = torch.where(small, x, 0.0)      # keeps the unused series (and its gradient) finite at large |x|
    series = torch.zeros_like(near_zero)
    for coefficient in reversed(K3_SERIES_COEFFICIENTS):
        series = series * near_zero + coefficient
    return torch.where(small, near_zero * near_zero * series, torch.expm1(x) - x)


def kl_estimate(ref_minus_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) at ``x = log π_ref − log π``: k3 ``e^x − x − 1`` (DeepSeekMath,
    verl's ``low_var_kl`` without its clamp; :func:`k3`, which stays accurate near 0), k1 ``−x``, k2 ``x²/2``,
    abs ``|x|``."""
    x = ref_minus_logp
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "abs":
        return x.abs()
    return k3(x)


def clipped_sentences(ratio: torch.Tensor, advantage: torch.Tensor, config: LossConfig,
                      clipped_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Where the objective clipped the sentence: ``ppo_clip``'s active clip branch (dual clip included),
    ``cispo``'s truncated weight (``ρ > eps_high``), ``geo_mean``'s clip of at least one token
    (``clipped_tokens``: their count per sentence); ``sapo`` and ``vespo`` clip nothing."""
    if config.objective == "cispo":
        return ratio > config.eps_high
    if config.objective == "geo_mean":
        return clipped_tokens > 0
    if config.objective in ("sapo", "vespo"):
        return torch.zeros_like(ratio, dtype=torch.bool)
    clipped = ((ratio > 1 + config.eps_high) & (advantage > 0)) | ((ratio < 1 - config.eps_low) & (advantage < 0))
    if config.clip_ratio_c is not None:
        clipped |= (advantage < 0) & (ratio > config.clip_ratio_c)
    return clipped


def group_sentence_advantages(rewards: torch.Tensor, num_sentences: torch.Tensor, group_size: int,
                              eps: float = 1e-4, weighting: str = "output", scale: str = "std",
                              mode: str = "sentence", answer_mix: float = 0.0,
                              baseline: str = "pooled") -> torch.Tensor:
    """Group-relative sentence advantages (``docs/design.md``, "Group advantages").

    rewards ``[B, S_max]`` float (entries at ``s >= num_sentences[b]`` are ignored, even NaN);
    num_sentences ``[B]`` int; consecutive blocks of ``group_size`` rows form the groups.
    ``baseline``: ``"pooled"`` (the seed: one mean and spread over all sentences of the group) or
    ``"split_final"`` (the last sentence of every answer, where its answer stops, is normalised among the group's
    last sentences, every other sentence among the group's other sentences, each pool with its own mean and spread
    and ``weighting``'s weights within the pool).
    ``answer_mix = α``: ``Â = (1 − α) · Â_sentence + α · Â_answer`` (the seed's multi-scale fusion), with
    ``Â_sentence`` the advantages of ``weighting``/``scale``/``mode``/``baseline`` and ``Â_answer``
    :func:`answer_advantages` (``α = 0``: the sentence level; ``α = 1``: every sentence its answer's advantage).
    Returns ``[B, S_max]`` in the dtype of ``rewards``, 0 where ``s >= num_sentences[b]``.
    """
    batch, num_slots = rewards.shape
    slot = torch.arange(num_slots, device=rewards.device)
    exists = slot < num_sentences.unsqueeze(1)                           # [B, S]
    # Shift each group by its largest reward: the statistics are shift-invariant, and a group of
    # equal rewards then centres to exactly 0 instead of to rounding noise divided by eps.
    masked = torch.where(exists, rewards, -torch.inf).reshape(batch // group_size, group_size * num_slots)
    shift = masked.amax(1, keepdim=True) if masked.numel() else masked.sum(1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, 0.0).repeat_interleave(group_size, dim=0)
    values = torch.where(exists, rewards - shift, 0.0)
    if baseline == "split_final":
        final = slot == (num_sentences - 1).unsqueeze(1)
        pools = (exists & ~final, exists & final)
    else:
        pools = (exists,)
    advantages = torch.zeros_like(values)
    for member in pools:             # disjoint: each sentence is normalised within its own pool
        advantages = advantages + _normalised_within(values, member, group_size, eps, weighting, scale)
    if mode == "cumulative":        # sentence s gets the sum of the normalised rewards of s .. S_i - 1
        advantages = advantages.flip(1).cumsum(1).flip(1)
        advantages = torch.where(exists, advantages, 0.0)
    if answer_mix != 0:
        answer = answer_advantages(rewards, num_sentences, group_size, eps=eps, scale=scale)
        advantages = torch.where(exists, (1 - answer_mix) * advantages + answer_mix * answer.unsqueeze(1), 0.0)
    return advantages


def _normalised_within(values: torch.Tensor, member: torch.Tensor, group_size: int, eps: float, weighting: str,
                       scale: str) -> torch.Tensor:
    """``(v − μ) / (σ + eps)`` (``scale="none"``: ``v − μ``) for the sentences where ``member [B, S]`` holds, with
    ``μ``, ``σ`` the group's weighted mean and spread over its members; 0 elsewhere."""
    batch, num_slots = values.shape
    if weighting == "output":       # every output with a member weighs 1, split evenly over its members
        weight = member / member.sum(1, keepdim=True).clamp(min=1).to(values.dtype)
    else:                           # every member sentence of the group weighs 1
        weight = member.to(values.dtype)

    def group_sum(per_slot):                                             # [B, S] -> [B / G, 1]
        return per_slot.reshape(batch // group_size, group_size * num_slots).sum(1, keepdim=True)

    def per_row(per_group):                                              # [B / G, 1] -> [B, 1]
        return per_group.repeat_interleave(group_size, dim=0)

    total_weight = group_sum(weight).clamp(min=1)                        # G' (or the group's sentence count)
    mean = per_row(group_sum(weight * values) / total_weight)
    centered = torch.where(member, values - mean, 0.0)
    if scale in ("std", "unbiased_std"):
        # unbiased_std: Bessel's correction on the group's weight (G' outputs, or its sentence count), as
        # torch.std and verl's grpo estimator compute it at one sentence per output
        count = total_weight if scale == "std" else (total_weight - 1).clamp(min=1)
        std = per_row(group_sum(weight * centered ** 2) / count).sqrt()
        normalised = centered / (std + eps)
    else:
        normalised = centered
    return torch.where(member, normalised, 0.0)


def answer_advantages(rewards: torch.Tensor, num_sentences: torch.Tensor, group_size: int, eps: float = 1e-4,
                      scale: str = "std") -> torch.Tensor:
    """``Â_answer [B]``: each answer's mean sentence reward ``r̄_i = (1/S_i) Σ_s r(i, s)``, normalised over the
    answers of its group that have a sentence (``(r̄_i − mean) / (std + eps)`` by ``scale``, every answer weighing
    1); 0 for an answer without sentences. rewards ``[B, S_max]``, num_sentences ``[B]`` as
    :func:`group_sentence_advantages`."""
    exists = torch.arange(rewards.shape[1], device=rewards.device) < num_sentences.unsqueeze(1)
    mean_reward = torch.where(exists, rewards, 0.0).sum(1) / num_sentences.clamp(min=1).to(rewards.dtype)
    has_sentence = (num_sentences > 0).long()
    return group_sentence_advantages(mean_reward.unsqueeze(1), has_sentence, group_size, eps=eps, scale=scale)[:, 0]


def pad_packed(values: torch.Tensor, cu_seqlens: torch.Tensor, fill=0) -> torch.Tensor:
    """Packed ``[N, ...]`` values (answer ``i`` at rows ``cu_seqlens[i]:cu_seqlens[i + 1]``) as a right-padded
    ``[B, T_max, ...]`` tensor holding ``fill`` past each answer's end; differentiable in ``values``.

    The statement of the packed layout (``docs/design.md``, "Packed inputs"): a packed call is the padded call on
    these tensors, segment ids padded with ``-1``. Materialises ``[B, T_max, ...]``: for the tests' oracle and the
    ``"reference"`` backend only.
    """
    cu = cu_seqlens.to(device=values.device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    batch = lengths.numel()
    longest = int(lengths.max()) if batch else 0
    answer = torch.repeat_interleave(torch.arange(batch, device=values.device), lengths, output_size=values.shape[0])
    position = torch.arange(values.shape[0], device=values.device) - cu[:-1][answer]
    return values.new_full((batch, longest, *values.shape[1:]), fill).index_put((answer, position), values)


def packed_sentence_grpo_loss(logits, completion_ids, segment_ids, advantages, old_logps, ref_logps, cu_seqlens,
                              config: LossConfig = LossConfig(), return_metrics: bool = False, process_group=None,
                              normalizer=None, is_weights=None, sampling_logps=None):
    """:func:`sentence_grpo_loss` on packed inputs: logits ``[N, V]``, the per-token tensors ``[N]``
    (``is_weights`` too), ``cu_seqlens [B + 1]``, advantages ``[B, S_max]`` or ``[B]``; equal by definition to the
    padded call on :func:`pad_packed` of each (which it makes)."""
    def pad(tensor, fill=0):
        return None if tensor is None else pad_packed(tensor, cu_seqlens, fill)

    return sentence_grpo_loss(pad(logits), pad(completion_ids), pad(segment_ids, -1), advantages, pad(old_logps),
                              pad(ref_logps), config, return_metrics=return_metrics, process_group=process_group,
                              normalizer=normalizer, is_weights=pad(is_weights, 1), sampling_logps=pad(sampling_logps))
