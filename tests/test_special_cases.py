"""Token-level GRPO and output-level GSPO are special cases of the sentence-level loss (``docs/design.md``).

Checked against an independent per-token formula written here (TRL's loss_type="grpo") and against
Liger-Kernel's triton_grpo_loss run under TRITON_INTERPRET=1.
"""

import os

import pytest
import torch
from cases import assert_relative_close, device_of, moved, native_unavailable, random_case

import sgrpo_kernels as sk
from sgrpo_kernels import reference
from sgrpo_kernels.config import LossConfig

OPTIONS = [dict(beta=0.0, temperature=1.0), dict(beta=0.04, temperature=0.9), dict(beta=0.1, temperature=1.3)]


def per_token_grpo(logits, completion_ids, mask, advantages, old_logps, ref_logps, *, level, beta, temperature,
                   eps=0.2):
    """TRL-style GRPO: per-token PPO loss + beta * k3, averaged per row over its tokens, then over rows."""
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, completion_ids.clamp(min=0)[..., None])[..., 0]
    mask = mask.to(logp.dtype)
    log_ratio = logp - old_logps
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)).expand_as(logp)
    ratio = torch.exp(log_ratio)
    advantage = advantages[:, None]
    per_token = -torch.minimum(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)
    if beta:
        per_token = per_token + beta * (torch.exp(ref_logps - logp) - (ref_logps - logp) - 1)
    return ((per_token * mask).sum(-1) / mask.sum(-1)).mean()


def level_case(level, seed, batch=4, length=9, vocab=50):
    case = random_case(batch=batch, length=length, vocab=vocab, num_slots=length, seed=seed,
                       per_row_advantages=True, empty_row=False, old_spread=0.2)
    scored = case["segment_ids"] >= 0
    if level == "token":   # each token its own sentence
        case["segment_ids"] = torch.where(scored, torch.arange(length), -1)
    else:                  # one sentence per output
        case["segment_ids"] = torch.where(scored, 0, -1)
    return case


def our_loss_and_grad(case, level, backend, **options):
    """Loss and ``logits.grad`` of one of our backends, on its device, returned on the CPU (``ratio_level`` from
    the level unless given; ``normalizer``/``is_weights`` are passed beside the options)."""
    options.setdefault("ratio_level", "mean" if level == "sequence" else "sum")
    arguments = moved(case, device_of(backend))
    if backend == "reference":
        batch = {name: options.pop(name, None) for name in ("normalizer", "is_weights")}
        loss = reference.sentence_grpo_loss(*arguments.values(), LossConfig(**options), **batch)
    else:
        loss = sk.sentence_grpo_loss(*arguments.values(), backend=backend, **options)
    (grad,) = torch.autograd.grad(loss, arguments["logits"])
    return loss.detach().cpu(), grad.cpu()


def assert_liger_logits_loss_matches(case, our_loss, our_grad, is_ratio=None, **liger_options):
    """Liger's ``triton_grpo_loss`` (under the interpreter; fp32) on the case's logits equals our loss and
    ``logits.grad``. Liger scores ``[B, T + 1, V]`` logits: a random last position is appended."""
    grpo_loss = pytest.importorskip("liger_kernel.transformers.grpo_loss",
                                    reason="liger-kernel (the dev extra) is the oracle of this test")
    batch, length, vocab = case["logits"].shape
    device = device_of("liger")
    as_input = lambda tensor: tensor.float().contiguous().to(device)  # noqa: E731
    liger_logits = torch.cat([case["logits"].detach(), torch.randn(batch, 1, vocab, dtype=torch.float64)], 1)
    liger_logits = liger_logits.float().contiguous().to(device).requires_grad_()
    liger_loss, _ = grpo_loss.triton_grpo_loss(
        liger_logits, as_input(case["old_logps"]), as_input(case["ref_logps"]),
        case["completion_ids"].clamp(min=0).to(device), as_input(case["advantages"]),
        as_input((case["segment_ids"] >= 0).float()), inplace=False, reduce=True,
        vllm_is_ratio=None if is_ratio is None else as_input(is_ratio), **liger_options)
    liger_loss.backward()
    # Liger computes in fp32: its loss is good to ~1e-5 of the terms it sums, not of a loss that nearly cancels
    assert abs(liger_loss.item() - our_loss.item()) <= 1e-5 * max(abs(our_loss.item()), 0.1)
    assert_relative_close(liger_logits.grad[:, :length].cpu(), our_grad.cpu(), 1e-5, "logits.grad")


def assert_liger_fused_loss_matches(case, backend, hidden, weight, options, is_ratio=None, **liger_options):
    """Liger's ``LigerFusedLinearGRPOLoss`` (fp32, uncompiled) equals our fused linear loss on ``backend``
    (``options``; ``is_ratio`` as our ``is_weights`` and Liger's ``vllm_is_ratio``): loss and both gradients."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss",
                                  reason="liger-kernel (the dev extra) is the oracle of this test")
    rest = list(moved(case, device_of(backend)).values())[1:]
    ours_hidden = hidden.clone().to(device_of(backend)).requires_grad_()
    ours_weight = weight.clone().to(device_of(backend)).requires_grad_()
    loss = sk.fused_linear_sentence_grpo_loss(
        ours_hidden, ours_weight, *rest, backend=backend, chunk_size=5,
        is_weights=None if is_ratio is None else is_ratio.to(device_of(backend)), **options)
    loss.backward()
    module = chunked.LigerFusedLinearGRPOLoss(beta=0.05, compiled=False,
                                              max_completion_length=case["logits"].shape[1], **liger_options)
    their_hidden, their_weight = hidden.float().requires_grad_(), weight.float().requires_grad_()
    their_loss, _ = module(their_hidden, their_weight, case["completion_ids"].clamp(min=0),
                           (case["segment_ids"] >= 0).float(), case["advantages"].float(),
                           ref_per_token_logps=case["ref_logps"].float(), old_per_token_logps=case["old_logps"].float(),
                           vllm_is_ratio=None if is_ratio is None else is_ratio.float())
    their_loss.backward()
    assert abs(their_loss.item() - loss.item()) <= 1e-5 * max(abs(loss.item()), 0.1)
    assert_relative_close(their_hidden.grad, ours_hidden.grad.cpu(), 1e-4, "grad hidden")
    assert_relative_close(their_weight.grad, ours_weight.grad.cpu(), 1e-4, "grad weight")


def random_head(vocab, seed=7, width=16):
    """Hidden states ``[4, 9, width]`` (the level cases' shape) and an LM head ``[vocab, width]``, float64."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 9, width, generator=generator, dtype=torch.float64)
    return hidden, torch.randn(vocab, width, generator=generator, dtype=torch.float64) * 0.3


@pytest.fixture(params=["reference", "triton", "torch", "native"])
def backend(request):
    if request.param == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    if request.param == "native" and native_unavailable() is not None:
        pytest.skip(native_unavailable())
    return request.param


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("options", OPTIONS)
def test_special_case_matches_per_token_formula(level, options, backend):
    case = level_case(level, seed=21)
    ours, our_grad = our_loss_and_grad(case, level, backend, **options)
    theirs = per_token_grpo(case["logits"], case["completion_ids"], case["segment_ids"] >= 0, case["advantages"],
                            case["old_logps"], case["ref_logps"], level=level, **options)
    (their_grad,) = torch.autograd.grad(theirs, case["logits"])
    rel = 1e-12 if backend == "reference" else 1e-9     # the kernels sum sentences in another order
    assert_relative_close(ours, theirs, rel, "loss")
    assert_relative_close(our_grad, their_grad, rel, "logits.grad")


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("options", OPTIONS)
def test_special_case_matches_liger_triton_grpo_loss(level, options, backend):
    grpo_loss = pytest.importorskip("liger_kernel.transformers.grpo_loss",
                                    reason="liger-kernel (the dev extra) is the oracle of this test")
    case = level_case(level, seed=33, vocab=1000)
    ours, our_grad = our_loss_and_grad(case, level, backend, **options)

    batch, length, vocab = case["logits"].shape
    device = device_of("liger")
    # Liger scores logits[:, :-1]: give it one extra trailing position, which must get no gradient.
    liger_logits = torch.cat([case["logits"].detach(), torch.randn(batch, 1, vocab, dtype=torch.float64)], 1)
    liger_logits = liger_logits.float().contiguous().to(device).requires_grad_()
    as_input = lambda tensor: tensor.contiguous().to(device)
    liger_loss, _ = grpo_loss.triton_grpo_loss(
        liger_logits, as_input(case["old_logps"].float()), as_input(case["ref_logps"].float()),
        as_input(case["completion_ids"].clamp(min=0)), as_input(case["advantages"].float()),
        as_input((case["segment_ids"] >= 0).float()), temperature=options["temperature"], beta=options["beta"],
        eps_low=0.2, eps_high=0.2, inplace=False, loss_type="grpo", importance_sampling_level=level, reduce=True)
    liger_loss.backward()
    assert_relative_close(liger_loss.detach().cpu(), ours, 1e-5, "loss")
    assert_relative_close(liger_logits.grad[:, :length].cpu(), our_grad, 1e-5, "logits.grad")
    assert torch.count_nonzero(liger_logits.grad[:, length]) == 0


# Liger loss_type -> our objective, reduction and normalizer (a function of B and T). Not here: Liger's "luspo",
# which averages n_i · ℓ_t over all B · T positions (TRL's luspo, which tests/test_trl.py checks, sums the tokens
# of each answer and averages over answers), and cispo/sapo at the sequence level, which Liger does not define.
LIGER_LOSS_TYPES = {
    "grpo": ("ppo_clip", "sentence_mean", None), "bnpo": ("ppo_clip", "token_mean", None),
    "dapo": ("ppo_clip", "token_mean", None),
    "dr_grpo": ("ppo_clip", "token_mean", lambda batch, length: batch * length),
    "cispo": ("cispo", "token_mean", None), "sapo": ("sapo", "sentence_mean", None),
}


@pytest.mark.parametrize("loss_type,level", [(loss_type, level) for loss_type in LIGER_LOSS_TYPES
                                              for level in ("token", "sequence")
                                              if not (level == "sequence" and loss_type in ("cispo", "sapo"))])
@pytest.mark.parametrize("corrections", [False, True], ids=["plain", "kl_correction+vllm_is"])
def test_the_family_matches_liger_triton_grpo_loss(loss_type, level, corrections, backend):
    """Every loss type Liger's triton_grpo_loss has, at the token and sequence levels, with and without TRL's
    bias-corrected KL and vLLM importance ratios, against our loss (Liger runs under the interpreter)."""
    case = level_case(level, seed=41, vocab=300)
    batch, length, vocab = case["logits"].shape
    objective, reduction, normalizer = LIGER_LOSS_TYPES[loss_type]
    eps_high = 1.5 if loss_type == "cispo" else 0.28          # cispo caps the ratio at eps_high itself
    is_ratio = 0.5 + torch.rand(batch, length, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss, grad = our_loss_and_grad(case, level, backend, beta=0.05, temperature=0.9, eps_low=0.2, eps_high=eps_high,
                                   objective=objective, reduction=reduction, kl_importance_weighting=corrections,
                                   normalizer=None if normalizer is None else normalizer(batch, length),
                                   is_weights=is_ratio.to(device_of(backend)) if corrections else None)
    assert_liger_logits_loss_matches(case, loss, grad, is_ratio if corrections else None, temperature=0.9,
                                     beta=0.05, eps_low=0.2, eps_high=eps_high, loss_type=loss_type,
                                     importance_sampling_level=level, use_bias_correction_kl=corrections)


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("bnpo", "token"), ("dapo", "token"),
                                             ("dr_grpo", "token"), ("cispo", "token"), ("sapo", "token"),
                                             ("grpo", "sequence"), ("dapo", "sequence")])
@pytest.mark.parametrize("corrections", [False, True], ids=["plain", "kl_correction+vllm_is"])
def test_the_family_matches_liger_fused_linear_grpo_loss(loss_type, level, corrections, backend):
    """Liger's LigerFusedLinearGRPOLoss (hidden states and LM head, fp32, uncompiled) against our fused linear
    loss: loss and the gradients of hidden and weight."""
    case = level_case(level, seed=43, vocab=200)
    batch, length, _ = case["logits"].shape
    hidden, weight = random_head(200)
    objective, reduction, normalizer = LIGER_LOSS_TYPES[loss_type]
    eps_high = 1.5 if loss_type == "cispo" else 0.28
    is_ratio = 0.5 + torch.rand(batch, length, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    options = dict(beta=0.05, eps_low=0.2, eps_high=eps_high, objective=objective, reduction=reduction,
                   kl_importance_weighting=corrections, ratio_level="mean" if level == "sequence" else "sum",
                   normalizer=None if normalizer is None else normalizer(batch, length))
    assert_liger_fused_loss_matches(case, backend, hidden, weight, options, is_ratio if corrections else None,
                                    epsilon_low=0.2, epsilon_high=eps_high, loss_type=loss_type,
                                    importance_sampling_level=level, use_bias_correction_kl=corrections)


@pytest.mark.parametrize("with_is_ratio", [False, True], ids=["plain", "vllm_is"])
def test_vespo_matches_liger_at_the_sequence_level(with_is_ratio, backend):
    """Liger's VESPO (TRL's ``get_gamma_weights``: one gamma weight per answer from the summed token log-ratios,
    the rollout engine's token ratios folded into it) is our ``vespo`` with one sentence per answer, for both of
    Liger's entry points. Liger sums the log ratios over every position, padding included: the rollout ratios
    are 1 there, as TRL computes them (its log-ratio difference is masked)."""
    case = level_case("sequence", seed=45, vocab=200)
    batch, length, _ = case["logits"].shape
    scored = case["segment_ids"] >= 0
    is_ratio = torch.where(scored, 0.5 + torch.rand(batch, length, generator=torch.Generator().manual_seed(9),
                                                    dtype=torch.float64), 1.0) if with_is_ratio else None
    options = dict(beta=0.05, objective="vespo", reduction="token_mean")
    loss, grad = our_loss_and_grad(case, "sequence", backend, temperature=0.9,
                                   is_weights=None if is_ratio is None else is_ratio.to(device_of(backend)), **options)
    assert_liger_logits_loss_matches(case, loss, grad, is_ratio, temperature=0.9, beta=0.05, loss_type="vespo",
                                     importance_sampling_level="token")
    hidden, weight = random_head(200)
    assert_liger_fused_loss_matches(case, backend, hidden, weight, options, is_ratio, loss_type="vespo",
                                    importance_sampling_level="token")


KL_MAGNITUDES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def exact_head(vocab=16, width=8, seed=5):
    """Hidden states ``[2, 8, width]`` of integers in [-2, 2] and an LM head ``[vocab, width]`` of multiples of 1/2 in
    [-1, 1]: every logit is a multiple of 1/2 in [-16, 16], exact in bf16 and fp16 and whatever order a matmul sums
    in, so the logits path and every fused linear path see the same logits. Token ids: the most likely token at
    even positions (|logp| mostly below 1, where fp32 resolves ``x = ref − logp`` finer than it rounds ``e^x`` near
    1, so that ``1 − exp(x)`` loses digits), random ones at odd positions. Returns the float64 hidden states and
    head, and the ids."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-2, 3, (2, 8, width), generator=generator).double()
    weight = torch.randint(-2, 3, (vocab, width), generator=generator).double() / 2
    ids = torch.randint(0, vocab, (2, 8), generator=generator)
    return hidden, weight, torch.where(torch.arange(8) % 2 == 0, (hidden @ weight.T).argmax(-1), ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("path", ["logits", "fused_linear"])
def test_k3_is_accurate_for_tiny_log_ratios(path, dtype, backend):
    """k3 = e^x − x − 1 at x = ref − logp of 1e-2 down to 1e-6 (both signs): ``kl_mean``, the loss and the gradient
    of the KL term (e^x − 1 and its chain) within 1e-4 of float64 computed from the same log-probs (the ones the
    backend computes from these logits, in low precision too), where the direct form cancels to 0 in fp32.

    Token-level segments, zero advantages and ``reduction="sum"`` make the loss ``beta · Σ_t k3_t`` and
    ``∂loss/∂logp_t = −beta · expm1(x_t)``; ``beta = 1/|x|`` keeps the gradients far from fp16's subnormals, and
    gradients in bf16/fp16 are held to their own rounding."""
    device = device_of(backend)
    hidden, weight, ids = exact_head()
    logits = (hidden @ weight.T).to(dtype)
    batch, length = ids.shape
    # the log-probs this backend computes from these logits (the reference's are rounded to the logits' dtype)
    logp = sk.token_logprobs(logits.to(device), ids.to(device), backend=backend, return_entropy=True)[0]
    logp = logp.detach().cpu().double()
    probs = torch.softmax(logits.double(), -1)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    signs = torch.where(torch.arange(batch * length).reshape(batch, length) % 2 == 0, 1.0, -1.0)
    spread = 1 + torch.rand(batch, length, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grad_rel = max(1e-4, torch.finfo(dtype).eps)       # low-precision gradients are rounded to their dtype
    segment_ids = torch.arange(length).expand(batch, length).to(device)
    advantages = torch.zeros(batch, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    for magnitude in KL_MAGNITUDES:
        ref_logps = (logp + signs * spread * magnitude).to(ref_dtype)
        x = ref_logps.double() - logp                   # the log-ratios the loss sees, exactly
        assert x.abs().min() > 0.2 * magnitude and x.abs().max() < 3 * magnitude
        k3 = torch.expm1(x) - x                         # float64: accurate to ~1e-10 at |x| = 1e-6
        beta = 1 / magnitude
        options = dict(beta=beta, reduction="sum", backend=backend, return_metrics=True)
        coef = -beta * torch.expm1(x)                   # ∂loss/∂logp_t
        logits_grad = coef[..., None] * (torch.nn.functional.one_hot(ids, logits.shape[-1]) - probs)
        arguments = (ids.to(device), segment_ids, advantages, None, ref_logps.to(device))
        if path == "logits":
            inputs = (logits.to(device).requires_grad_(),)
            loss, metrics = sk.sentence_grpo_loss(*inputs, *arguments, **options)
            names, expected_grads = ("logits",), (logits_grad,)
        else:
            inputs = (hidden.to(dtype).to(device).requires_grad_(), weight.to(dtype).to(device).requires_grad_())
            loss, metrics = sk.fused_linear_sentence_grpo_loss(*inputs, *arguments, chunk_size=5, **options)
            names = ("hidden", "weight")
            expected_grads = (logits_grad @ weight,
                              logits_grad.reshape(-1, logits.shape[-1]).T @ hidden.reshape(-1, hidden.shape[-1]))
        grads = torch.autograd.grad(loss, inputs)
        what = f"|x| ~ {magnitude:g}"
        assert_relative_close(metrics["kl_mean"].cpu(), k3.mean(), 1e-4, f"kl_mean at {what}")
        assert_relative_close(loss.cpu(), beta * k3.sum(), 1e-4, f"loss at {what}")
        for name, grad, expected in zip(names, grads, expected_grads):
            assert_relative_close(grad.cpu(), expected, grad_rel, f"gradient of the {name} at {what}")
