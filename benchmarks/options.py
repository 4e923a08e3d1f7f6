"""The loss options whose cost the benchmarks report: provider ``"<backend>:<variant>"`` runs this package's
loss with one variant's options on top of the benchmark's defaults (``beta`` and off-policy inputs), so that the
row's time and memory, next to the plain ``"<backend>"`` row of the same run, is what the option costs."""

from __future__ import annotations

VARIANTS = {
    "kl_weighted": dict(kl_importance_weighting=True),             # TRL's default use_bias_correction_kl
    "dual_clip": dict(clip_ratio_c=3.0),
    "cispo": dict(objective="cispo", eps_high=5.0),
    "sapo": dict(objective="sapo"),
    "geo_mean": dict(objective="geo_mean", ratio_level="mean"),
    "vespo": dict(objective="vespo"),
    "entropy_bonus": dict(entropy_coef=0.01),
    "entropy_mask": dict(top_entropy_quantile=0.2),                 # the fused path visits its chunks twice
    "off_policy_mask": dict(off_policy_mask_threshold=0.0),         # likewise (needs every log-prob first)
    "is_token_truncate": dict(is_mode="token_truncate"),
    "is_weights": dict(),                                           # precomputed [B, T] weights
}
NEEDS_SAMPLING = ("off_policy_mask", "is_token_truncate")


def split(name: str) -> tuple[str, str | None]:
    """``"torch:cispo"`` -> ``("torch", "cispo")``; ``"torch"`` -> ``("torch", None)``."""
    backend, _, variant = name.partition(":")
    if variant and variant not in VARIANTS:
        raise ValueError(f"unknown option variant {variant!r}; one of {', '.join(VARIANTS)}")
    return backend, variant or None


def keywords(variant: str | None, inputs: dict) -> dict:
    """The loss's keyword arguments for ``variant`` (``None``: none) on the benchmark's ``inputs``."""
    if variant is None:
        return {}
    options = dict(VARIANTS[variant])
    if variant in NEEDS_SAMPLING:
        options["sampling_logps"] = inputs["sampling_logps"]
    if variant == "is_weights":
        options["is_weights"] = inputs["is_weights"]
    return options


def providers(backend: str) -> list[str]:
    """``backend`` and every ``backend:variant``."""
    return [backend] + [f"{backend}:{variant}" for variant in VARIANTS]
