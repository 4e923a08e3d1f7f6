"""Pass B of the native backend through ``torch.ops.sgrpo_native`` (``csrc/sentence_passes.cpp``): the contract
and the arithmetic of ``ops/torch/passes.py``, as three C++ loops."""

from __future__ import annotations

import torch

from ...config import LossConfig
from ..layout import SentenceLayout, SentenceSums, SentenceTerms
from ..passes import KL_ESTIMATOR_CODES, OBJECTIVE_CODES, SCALE_CODES, float_vector, index_vector, new_output
from .extension import load


def _vector(tensor, dtype):
    return None if tensor is None else float_vector(tensor, dtype)


def sentence_sums(logp, old_logps, ref_logps, segment_ids, num_slots: int, sums: SentenceSums, config,
                  tokens=None, token_weights=None, advantages=None) -> None:
    """Pass B, sums; the contract of ``ops.passes.Passes.sentence_sums``."""
    load()
    dtype = logp.dtype
    torch.ops.sgrpo_native.sentence_sums_(
        logp, _vector(old_logps, dtype), _vector(ref_logps, dtype) if sums.kl is not None else None,
        _vector(token_weights, dtype), index_vector(segment_ids), None if tokens is None else index_vector(tokens),
        num_slots, segment_ids.shape[1], KL_ESTIMATOR_CODES[config.kl_estimator],
        _vector(advantages, dtype) if sums.clipped_log_ratio is not None else None,
        advantages is not None and advantages.dim() == 1, config.eps_low, config.eps_high, sums.log_ratio, sums.kl,
        sums.logp, sums.weight, sums.clipped_log_ratio, sums.clipped_tokens)


def sentence_terms(layout: SentenceLayout, sums: SentenceSums, advantages, config: LossConfig) -> SentenceTerms:
    """Pass B, per-sentence terms; the contract of ``ops.passes.Passes.sentence_terms``."""
    load()
    total = layout.count.numel()
    dtype, device = layout.weight.dtype, layout.weight.device
    fresh = lambda needed=True: new_output((total,), dtype, device) if needed else None  # noqa: E731
    terms = SentenceTerms(weighted_loss=fresh(), ratio=fresh(), ratio_coef=fresh(), kl_coef=fresh(sums.kl is not None),
                          weight_coef=fresh(config.objective in ("cispo", "vespo")),
                          clip_coef=fresh(config.objective == "geo_mean"))
    torch.ops.sgrpo_native.sentence_terms_(
        layout.count.contiguous(), layout.weight.contiguous(), sums.log_ratio, sums.kl, sums.logp, sums.weight,
        sums.clipped_log_ratio, sums.log_is, float_vector(advantages, dtype), OBJECTIVE_CODES[config.objective],
        layout.num_slots, advantages.dim() == 1, config.ratio_level == "mean", config.kl_reduction == "mean",
        config.kl_importance_weighting, config.delta is not None, config.clip_ratio_c is not None, config.eps_low,
        config.eps_high, config.beta, config.delta if config.delta is not None else 0.0, config.clamp_log_ratio,
        config.clip_ratio_c if config.clip_ratio_c is not None else 0.0, config.sapo_tau_pos, config.sapo_tau_neg,
        config.vespo_k_pos, config.vespo_lambda_pos, config.vespo_k_neg, config.vespo_lambda_neg,
        terms.weighted_loss, terms.ratio, terms.ratio_coef, terms.kl_coef, terms.weight_coef, terms.clip_coef)
    return terms


def token_coefficients(logp, ref_logps, segment_ids, num_slots: int, terms: SentenceTerms, config, tokens=None,
                       token_weights=None, old_logps=None, advantages=None):
    """Pass B, per-token coefficient; the contract of ``ops.passes.Passes.token_coefficients``."""
    load()
    dtype = logp.dtype
    count = segment_ids.numel() if tokens is None else tokens.numel()
    coef = new_output((count,), dtype, logp.device)
    geo = terms.clip_coef is not None
    torch.ops.sgrpo_native.token_coefficients_(
        logp, _vector(ref_logps, dtype) if terms.kl_coef is not None else None, _vector(token_weights, dtype),
        _vector(old_logps, dtype) if geo else None, _vector(advantages, dtype) if geo else None,
        geo and advantages is not None and advantages.dim() == 1, index_vector(segment_ids),
        None if tokens is None else index_vector(tokens), num_slots, segment_ids.shape[1],
        KL_ESTIMATOR_CODES[config.kl_estimator], config.eps_low, config.eps_high, terms.ratio_coef, terms.kl_coef,
        terms.weight_coef, terms.clip_coef, coef)
    return coef


def group_advantages(rewards, num_sentences, group_size: int, eps: float, weighting: str, scale: str,
                     mode: str, answer_mix: float = 0.0, baseline: str = "pooled") -> torch.Tensor:
    """Group-relative sentence advantages in C++ (``csrc/group_advantages.cpp``); the contract of
    ``ops.passes.Passes.group_advantages``."""
    load()
    return torch.ops.sgrpo_native.group_advantages(rewards, num_sentences, group_size, float(eps),
                                                   weighting == "output", SCALE_CODES[scale], mode == "cumulative",
                                                   float(answer_mix), baseline == "split_final")
