"""Options of the sentence-level GRPO loss and the input checks shared by every backend.

Every public entry point builds one :class:`LossConfig` (which validates the options) and calls
:func:`check_loss_inputs` before any backend runs, so that all backends see the same, already
validated inputs. The checks read only the small ``[B, T]`` tensors, never ``logits``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .choices import ADVANTAGE_BASELINES, RATIO_LEVELS  # noqa: F401  (the options' names, also here)

OBJECTIVES = ("ppo_clip", "cispo", "sapo", "geo_mean", "vespo")
KL_ESTIMATORS = ("k3", "k1", "k2", "abs")
IS_MODES = ("token_truncate", "token_mask", "sentence_truncate", "sentence_mask", "sequence_truncate",
            "sequence_mask")
KL_REDUCTIONS = ("mean", "sum")
REDUCTIONS = ("sentence_mean", "token_mean", "sum", "answer_mean_sentence_sum", "answer_mean_token_sum")
ADVANTAGE_WEIGHTINGS = ("output", "sentence")
ADVANTAGE_SCALES = ("std", "none", "unbiased_std")
ADVANTAGE_MODES = ("sentence", "cumulative")

LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_real(name: str, value, *, low=None, low_inclusive=True, allow_inf=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        relation = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {relation} {low}, got {value}")
    return value


# The one description of every loss option; the docstrings of the public functions are built from it.
OPTION_DOCS = {
    "eps_low": "clip range ``[1 - eps_low, 1 + eps_high]`` of the sentence ratio; ``0 <= eps_low < 1``.",
    "eps_high": "upper clip ``1 + eps_high``; ``>= 0``.",
    "beta": "weight of the k3 KL term to the reference policy; ``> 0`` needs ``ref_logps``.",
    "delta": "cap of the unclipped ratio, ``min(ρ, delta)`` (two-sided clipping: it acts where ``Â < 0``); "
             "``None`` = no cap.",
    "temperature": "the logits are divided by it before the softmax; ``> 0``.",
    "ratio_level": '``"sum"`` (product of the token ratios) or ``"mean"`` (their geometric mean) per sentence.',
    "kl_reduction": '``"mean"`` or ``"sum"`` of the token k3 values of a sentence.',
    "reduction": '``"sentence_mean"`` (mean over answers of the mean over their sentences), ``"token_mean"`` '
                 '(sentences weighted by their tokens), ``"sum"``, ``"answer_mean_sentence_sum"`` (mean over '
                 'answers of the sum over their sentences) or ``"answer_mean_token_sum"`` (mean over answers of '
                 'the sum over their tokens); a ``normalizer`` replaces the denominator.',
    "clamp_log_ratio": "the sentence log-ratio is clamped to ``±clamp_log_ratio`` (``inf``: no clamp).",
    "objective": '``"ppo_clip"`` (clipped surrogate), ``"cispo"`` (``−sg(min(ρ, eps_high)) · Â · log π`` per '
                 'token), ``"sapo"`` (soft gate ``4/τ · σ(τ(ρ − 1)) · Â``), ``"geo_mean"`` (GMPO: the ratio of the '
                 'sign-aware clipped token log-ratios, ``−Â · ρ_clip``) or ``"vespo"`` (``−sg(φ(w)) · Â · log π`` '
                 'with the gamma weight ``φ``); ``docs/design.md``, "Objectives".',
    "clip_ratio_c": "dual clip of ``ppo_clip`` (verl): where ``Â < 0`` the sentence loss is at most "
                    "``−clip_ratio_c · Â``; ``None`` = off, else ``> 1``.",
    "sapo_tau_pos": "``τ`` of ``sapo`` for ``Â > 0``; ``> 0``.",
    "sapo_tau_neg": "``τ`` of ``sapo`` for ``Â <= 0``; ``> 0``.",
    "vespo_k_pos": "``k`` of ``vespo``'s ``φ(w) = e^λ · w^k · e^(−λw)`` for ``Â >= 0`` (TRL's ``vespo_k_pos``).",
    "vespo_lambda_pos": "``λ`` of ``vespo`` for ``Â >= 0``; ``> 0``.",
    "vespo_k_neg": "``k`` of ``vespo`` for ``Â < 0``.",
    "vespo_lambda_neg": "``λ`` of ``vespo`` for ``Â < 0``; ``> 0``.",
    "kl_estimator": '``"k3"`` (``e^x − x − 1``, ``x = log π_ref − log π``), ``"k1"`` (``−x``), ``"k2"`` (``x²/2``) '
                    'or ``"abs"`` (``|x|``).',
    "kl_importance_weighting": "multiply the sentence's KL term by its ratio ``ρ`` (TRL's "
                               "``use_bias_correction_kl``), gradient through both.",
    "top_entropy_quantile": "keep the policy loss (and the entropy bonus) only on the tokens whose entropy is in "
                            "the top ``q`` of the batch's scored tokens (TRL's ``top_entropy_quantile``); 1 = all.",
    "off_policy_mask_threshold": "drop the policy loss of a sentence with ``Â < 0`` whose mean "
                                 "``log π_sampling − log π`` exceeds it (DeepSeek-V3.2's off-policy mask, per "
                                 "sentence; TRL's ``off_policy_mask_threshold``); ``None`` = off.",
    "is_mode": "importance weights of the rollout engine computed here from ``sampling_logps``: ``exp(old − "
               "sampling)`` per token, or of its sum over the sentence or the answer, truncated to or masked "
               "outside ``[is_clip_min, is_clip_max]`` (TRL's ``vllm_importance_sampling_mode``); ``None`` = off.",
    "is_clip_min": "lower bound of ``is_mode``'s weights (``None``: none).",
    "is_clip_max": "upper bound of ``is_mode``'s weights (``None``: none).",
    "entropy_coef": "subtract ``entropy_coef ·`` the mean entropy of the scored tokens (an exploration bonus, "
                    "with its gradient; TRL's ``entropy_coef``, verl's ``entropy_coeff``); 0 = off.",
}


def config_from(values: dict) -> "LossConfig":
    """The :class:`LossConfig` of the options in ``values`` (a public function's ``locals()``): the functions keep
    explicit keyword signatures without writing the option list out a second time."""
    return LossConfig(**{name: values[name] for name in OPTION_DOCS})


def option_docs(indent: int = 8) -> str:
    """``name: text`` lines of every option, for docstrings (``{options}`` in the public functions' docs)."""
    pad = " " * indent
    return "\n".join(f"{pad}{name}: {text}" for name, text in OPTION_DOCS.items())


def documented(function):
    """Fill ``{options}`` in ``function``'s docstring with :func:`option_docs`."""
    function.__doc__ = function.__doc__.replace("{options}", option_docs().lstrip())
    return function


@dataclass(frozen=True)
class LossConfig:
    """The scalar options of the loss (``OPTION_DOCS``), validated on construction; the defaults of every
    public entry point are these (a test holds them equal)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0
    delta: float | None = None
    temperature: float = 1.0
    ratio_level: str = "sum"
    kl_reduction: str = "mean"
    reduction: str = "sentence_mean"
    clamp_log_ratio: float = 20.0
    objective: str = "ppo_clip"
    clip_ratio_c: float | None = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    kl_estimator: str = "k3"
    kl_importance_weighting: bool = False
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    is_mode: str | None = None
    is_clip_min: float | None = None
    is_clip_max: float | None = 3.0

    @classmethod
    def unchecked(cls, **options) -> LossConfig:
        """The config of options that were validated when their request was built (a custom op rebuilding it from
        its arguments): every field given, nothing checked again."""
        config = object.__new__(cls)
        for field in dataclasses.fields(cls):
            object.__setattr__(config, field.name, options[field.name])
        return config

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # the dataclass is frozen
        set_("eps_low", _check_real("eps_low", self.eps_low, low=0.0))
        if self.eps_low >= 1.0:
            raise ValueError(f"eps_low must be < 1 (the lower clip bound 1 - eps_low must stay positive), "
                             f"got {self.eps_low}")
        set_("eps_high", _check_real("eps_high", self.eps_high, low=0.0))
        set_("beta", _check_real("beta", self.beta, low=0.0))
        if self.delta is not None:
            set_("delta", _check_real("delta", self.delta, low=0.0, low_inclusive=False))
        set_("temperature", _check_real("temperature", self.temperature, low=0.0, low_inclusive=False))
        set_("clamp_log_ratio", _check_real("clamp_log_ratio", self.clamp_log_ratio, low=0.0,
                                            low_inclusive=False, allow_inf=True))
        _check_choice("ratio_level", self.ratio_level, RATIO_LEVELS)
        _check_choice("kl_reduction", self.kl_reduction, KL_REDUCTIONS)
        _check_choice("reduction", self.reduction, REDUCTIONS)
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.clip_ratio_c is not None:
            set_("clip_ratio_c", _check_real("clip_ratio_c", self.clip_ratio_c, low=1.0, low_inclusive=False))
        set_("sapo_tau_pos", _check_real("sapo_tau_pos", self.sapo_tau_pos, low=0.0, low_inclusive=False))
        set_("sapo_tau_neg", _check_real("sapo_tau_neg", self.sapo_tau_neg, low=0.0, low_inclusive=False))
        for name in ("vespo_k_pos", "vespo_k_neg"):
            set_(name, _check_real(name, getattr(self, name)))
        for name in ("vespo_lambda_pos", "vespo_lambda_neg"):
            set_(name, _check_real(name, getattr(self, name), low=0.0, low_inclusive=False))
        set_("entropy_coef", _check_real("entropy_coef", self.entropy_coef))
        set_("top_entropy_quantile", _check_real("top_entropy_quantile", self.top_entropy_quantile, low=0.0,
                                                 low_inclusive=False))
        if self.top_entropy_quantile > 1.0:
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")
        if self.is_mode is not None:
            _check_choice("is_mode", self.is_mode, IS_MODES)
        for name in ("is_clip_min", "is_clip_max"):
            if getattr(self, name) is not None:
                set_(name, _check_real(name, getattr(self, name), low=0.0))
        if self.off_policy_mask_threshold is not None:
            set_("off_policy_mask_threshold", _check_real("off_policy_mask_threshold", self.off_policy_mask_threshold))
        if not isinstance(self.kl_importance_weighting, bool):
            raise TypeError("kl_importance_weighting must be a bool, "
                            f"got {type(self.kl_importance_weighting).__name__}")


def _check_tensor(name: str, value, *, ndim=None, dtypes=None, kind=None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
    if kind == "integer" and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if kind == "floating" and not value.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")


def _check_shape(name: str, value: torch.Tensor, shape: tuple) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")


def _check_same_device(reference_name: str, device: torch.device, **others) -> None:
    for name, value in others.items():
        if value is not None and value.device != device:
            raise ValueError(f"{name} is on {value.device} but {reference_name} is on {device}; "
                             "all tensors must be on one device")


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int, where: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` if an id (where ``where`` is true, or everywhere) is outside ``[0, vocab_size)``."""
    selected = ids if where is None else ids[where]
    if selected.numel() and bool(((selected < 0) | (selected >= vocab_size)).any()):
        bad = selected[(selected < 0) | (selected >= vocab_size)][0].item()
        raise ValueError(f"{name} must lie in [0, {vocab_size}) (the vocabulary of logits), found {bad}")


def check_cu_seqlens(cu_seqlens) -> int:
    """Check the form of a packed batch's ``cu_seqlens`` (a 1-D integer tensor of ``B + 1`` offsets) without
    reading it; returns ``B``. Raises ``ValueError`` (:func:`check_cu_seqlens_values` checks the offsets)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor of B + 1 offsets, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must have an integer dtype (int32 or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with B + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    return cu_seqlens.numel() - 1


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, num_tokens: int) -> None:
    """Raise ``ValueError`` unless ``0 = cu[0] <= cu[1] <= ... <= cu[B] = num_tokens`` (one host read of ``B + 1``
    ints)."""
    offsets = cu_seqlens.detach().to("cpu", torch.int64)
    if int(offsets[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(offsets[0])}")
    steps = offsets[1:] - offsets[:-1]
    if bool((steps < 0).any()):
        at = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{at}] = {int(offsets[at])} > "
                         f"cu_seqlens[{at + 1}] = {int(offsets[at + 1])}")
    if int(offsets[-1]) != num_tokens:
        raise ValueError(f"cu_seqlens must end at the number of packed tokens N = {num_tokens}, "
                         f"got {int(offsets[-1])}")


def check_loss_inputs(logits_shape, logits_dtype, logits_device, completion_ids, segment_ids, advantages,
                      old_logps, ref_logps, config: LossConfig, *, logits_name: str = "logits",
                      cu_seqlens=None) -> None:
    """Validate the shapes, dtypes and devices of the loss's inputs; raise before any kernel runs.

    Reads no tensor's values (so ``torch.compile`` traces it); :func:`check_loss_values` checks the ids.
    ``logits_shape`` is ``(B, T, V)``, or ``(N, V)`` for packed inputs (``cu_seqlens``, whose offsets
    :func:`check_cu_seqlens_values` checks): the logits themselves are never read here, so the fused
    linear path can pass the shape of logits it never materialises.
    """
    if cu_seqlens is None and len(logits_shape) != 3:
        raise ValueError(f"{logits_name} must have shape [B, T, V], got {tuple(logits_shape)}")
    if cu_seqlens is not None and len(logits_shape) != 2:
        raise ValueError(f"{logits_name} must have shape [N, V] for packed inputs (cu_seqlens given), "
                         f"got {tuple(logits_shape)}")
    if logits_dtype not in LOGIT_DTYPES:
        raise TypeError(f"{logits_name} must have dtype in {[str(d) for d in LOGIT_DTYPES]}, got {logits_dtype}")
    *tokens, vocab = logits_shape
    batch = tokens[0] if cu_seqlens is None else check_cu_seqlens(cu_seqlens)
    if vocab < 1:
        raise ValueError(f"{logits_name} must have a vocabulary of at least one entry, got V={vocab}")
    _check_tensor("completion_ids", completion_ids, ndim=len(tokens), kind="integer")
    _check_shape("completion_ids", completion_ids, tokens)
    _check_tensor("segment_ids", segment_ids, ndim=len(tokens), kind="integer")
    _check_shape("segment_ids", segment_ids, tokens)
    _check_tensor("advantages", advantages, ndim=(1, 2), kind="floating")
    if advantages.shape[0] != batch:
        raise ValueError(f"advantages must have shape [B] or [B, S_max] with B={batch}, got {tuple(advantages.shape)}")
    for name, value in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if value is not None:
            _check_tensor(name, value, ndim=len(tokens), kind="floating")
            _check_shape(name, value, tokens)
    if config.beta > 0 and ref_logps is None:
        raise ValueError(f"ref_logps is required when beta > 0 (beta={config.beta})")
    _check_same_device(logits_name, logits_device, completion_ids=completion_ids, segment_ids=segment_ids,
                       advantages=advantages, old_logps=old_logps, ref_logps=ref_logps)


def check_loss_values(completion_ids: torch.Tensor, segment_ids: torch.Tensor, advantages: torch.Tensor,
                      vocab: int) -> None:
    """Raise ``ValueError`` for segment ids outside ``[-1, S_max)`` or scored token ids outside ``[0, V)``.

    Token ids are checked only where ``segment_ids >= 0``: unscored positions (padding) may hold any id,
    e.g. ``-100`` (``completion_ids=None``: a loss on given log-probs, no ids to check). Reads the small
    ``[B, T]`` tensors (one host sync); the custom ops run it before any kernel.
    """
    if segment_ids.numel():
        lowest = int(segment_ids.min())
        if lowest < -1:
            raise ValueError(f"segment_ids must be >= -1 (-1 marks unscored tokens), found {lowest}")
        if advantages.dim() == 2:
            highest = int(segment_ids.max())
            if highest >= advantages.shape[1]:
                raise ValueError(f"segment_ids must be < S_max = advantages.shape[1] = {advantages.shape[1]}, "
                                 f"found {highest}")
    if completion_ids is not None:
        check_token_ids("completion_ids", completion_ids, vocab, where=segment_ids >= 0)
