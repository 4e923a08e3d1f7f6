"""A minimal GRPO trainer: rollouts, sentence rewards, group advantages, the fused loss (``sgrpo train``)."""
