"""Model-based step scorers on tiny models built from configs: the generative verifier's three modes agree (fp32,
answers of 0, 1 and many steps, left padding, several batches) and one_pass runs one forward per batch through its
segment attention, which computes exactly the keys each query sees; the process reward model (causal-LM and
token-classification heads) equals scoring each prefix on its own; bad options fail before any forward; min-form
credit; a composite with a model term as a TRL trainer's sentence reward."""

import warnings

import pytest
import torch
from cases import train_byte_level_bpe
from test_rewards import BAD, GOOD, GOOD_ZH, QUESTION, QUESTION_ZH

from sgrpo_kernels.rewards import (
    CompositeReward,
    FormatReward,
    GenerativeVerifier,
    MinForm,
    ProcessRewardModel,
    model_scoring,
)
from sgrpo_kernels.rewards.logic import _one_pass_batch

transformers = pytest.importorskip("transformers", reason="the step scorers run transformers models")

# answers of many (up to 12), one and no steps, of odd and even lengths, in several batches
QUESTIONS = [QUESTION, QUESTION, QUESTION_ZH, QUESTION, QUESTION_ZH, QUESTION]
ANSWERS = [GOOD, BAD[:1], GOOD_ZH, [], BAD, GOOD + BAD + GOOD]
CORPUS = [QUESTION, "".join(GOOD), "".join(BAD), QUESTION_ZH, "".join(GOOD_ZH),
          "Question: Solution steps: Is the last step above correct and logically valid? Answer Yes or No: Yes No"]
TAG = "<step>"


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = train_byte_level_bpe(CORPUS, vocab_size=600)
    tokenizer.add_special_tokens({"additional_special_tokens": [TAG]})
    return tokenizer


def config(tokenizer, **overrides):
    options = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return transformers.Qwen2Config(**{**options, **overrides})


def causal_lm(tokenizer, **overrides):
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config(tokenizer, **overrides)).eval()


def count_forwards(model, calls: list | None = None) -> list:
    """Appends the input shape of every forward of the model's decoder (every mode runs it once per forward) to
    ``calls`` (a new list by default), and returns it."""
    calls = [] if calls is None else calls
    model.base_model.register_forward_hook(lambda module, args, kwargs, output: calls.append(
        tuple(kwargs.get("input_ids", args[0] if args else None).shape)), with_kwargs=True)
    return calls


def record_attention(model) -> list:
    """Appends the attention implementation the model's layers dispatch to at every forward of its decoder."""
    seen = []
    model.base_model.register_forward_pre_hook(
        lambda module, args: seen.append(model.config._attn_implementation))
    return seen


def assert_scores_close(actual, expected, tolerance=1e-5):
    assert [len(row) for row in actual] == [len(row) for row in expected]
    for row, (got, want) in enumerate(zip(actual, expected)):
        assert got == pytest.approx(want, abs=tolerance), row


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_verifier_modes_agree_and_one_pass_runs_one_forward_per_batch(tokenizer, attention):
    model = causal_lm(tokenizer, attn_implementation=attention)
    calls, dispatched = count_forwards(model), record_attention(model)
    scores = {}
    for mode in ("one_pass", "cache", "batched"):
        calls.clear()
        scores[mode] = GenerativeVerifier(model, tokenizer, mode=mode, batch_size=2)(QUESTIONS, ANSWERS)
        scores[mode + " calls"] = len(calls)
    assert [len(row) for row in scores["one_pass"]] == [4, 1, 4, 0, 4, 12]
    assert_scores_close(scores["one_pass"], scores["cache"])
    assert_scores_close(scores["batched"], scores["cache"])
    assert len({round(score, 6) for row in scores["cache"] for score in row}) > 5       # the steps are told apart
    # one_pass: ceil(5 answers with steps / 2); cache: S + 1 per answer; batched: ceil(25 prompts / 2)
    assert (scores["one_pass calls"], scores["cache calls"], scores["batched calls"]) == (3, 25 + 5, 13)
    # one_pass's forwards run through its segment attention, the other modes' through the model's own
    assert dispatched == [model_scoring.ONE_PASS_ATTENTION] * 3 + [attention] * 43
    assert model.config._attn_implementation == attention


def test_one_pass_serves_a_model_loaded_with_flash_attention(tokenizer):
    """one_pass does not use the model's attention implementation, so flash attention (absent here: the other
    modes cannot run it on this machine) gives the scores of sdpa."""
    model = causal_lm(tokenizer)
    expected = GenerativeVerifier(model, tokenizer, mode="cache")(QUESTIONS, ANSWERS)
    model.config._attn_implementation = "flash_attention_2"
    assert_scores_close(GenerativeVerifier(model, tokenizer, batch_size=4)(QUESTIONS, ANSWERS), expected)
    assert model.config._attn_implementation == "flash_attention_2"


def dense_mask(segments, batch: int, width: int) -> torch.Tensor:
    """``[B, W, W]`` bool: the keys each query of ``segments`` sees, as one mask."""
    mask = torch.zeros(batch, width, width, dtype=torch.bool)
    for row, queries, prefix, _ in segments:
        if prefix is not None:
            mask[row, queries, prefix] = True
        mask[row, queries, queries] = torch.ones(queries.stop - queries.start, queries.stop - queries.start,
                                                 dtype=torch.bool).tril()
    return mask


def test_one_pass_layout_sees_each_steps_prefix_and_copy(tokenizer):
    """The segments of a left-padded batch give copy ``s`` the answer tokens before the end of step ``s`` (by
    position id) and itself causally, the answer itself causally, and padding to no query."""
    verifier = GenerativeVerifier(causal_lm(tokenizer), tokenizer)
    pieces = [verifier._pieces(question, answer) for question, answer in zip(QUESTIONS[:3], ANSWERS[:3])]
    ids, positions, segments, (rows, columns) = _one_pass_batch(pieces, verifier.pad_id, torch.device("cpu"))
    batch, width = ids.shape
    judge, firsts = len(pieces[0][2]), []
    for row, (context, steps, _) in enumerate(pieces):
        length = len(context) + sum(map(len, steps))
        first = width - length - judge * len(steps)
        firsts.append(first)
        assert (ids[row, :first] == verifier.pad_id).all() and not positions[row, :first].any()
        copy = torch.full((width,), -2)                          # -2 padding, -1 answer, s judge copy of step s
        copy[first:first + length] = -1
        copy[first + length:] = torch.arange(len(steps)).repeat_interleave(judge)
        ends = torch.tensor([len(context) + sum(map(len, steps[:step + 1])) for step in range(len(steps))])
        assert positions[row, first:first + length].tolist() == list(range(length))
        assert positions[row, first + length:].tolist() == (ends[:, None] + torch.arange(judge)).reshape(-1).tolist()
        prefix_end = torch.where(copy >= 0, ends[copy.clamp(min=0)], length)
        causal = positions[row, None, :] <= positions[row, :, None]
        answer_key = (copy[None, :] == -1) & (positions[row, None, :] < prefix_end[:, None])
        same_copy = (copy[None, :] == copy[:, None]) & (copy[None, :] >= 0)
        expected = causal & (answer_key | same_copy) & (copy[:, None] != -2)
        assert torch.equal(dense_mask(segments, batch, width)[row], expected), row
        assert columns[rows == row].tolist() == (first + length + judge * torch.arange(1, len(steps) + 1) - 1).tolist()
    assert min(firsts) == 0 < max(firsts)                                     # rows of different widths


def test_segment_attention_equals_masked_sdpa_on_the_keys_seen():
    """Tensor level, float64, grouped-query heads: each segment's queries get the scaled dot-product attention of
    the dense mask; a column in no segment gets zeros."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, width, dim = 2, 4, 11, 8
    query = torch.randn(batch, heads, width, dim, dtype=torch.float64, generator=generator)
    key, value = (torch.randn(batch, 2, width, dim, dtype=torch.float64, generator=generator) for _ in range(2))
    layout = [(0, (0, 5), None), (0, (5, 8), (0, 2)), (0, (8, 11), (0, 5)), (1, (3, 9), None), (1, (9, 11), (3, 4))]
    segments = [model_scoring.segment(row, slice(*queries), prefix and slice(*prefix), torch.device("cpu"))
                for row, queries, prefix in layout]
    output, weights = model_scoring.segment_attention(None, query, key, value, None, scaling=0.3, segments=segments)
    mask = dense_mask(segments, batch, width)
    seen = mask.any(-1)
    mask[~seen] = True                                           # queries of no segment: anything finite
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=mask[:, None], scale=0.3)
    expected = expected.transpose(1, 2)
    assert weights is None and output.shape == (batch, width, heads, dim)
    torch.testing.assert_close(output[seen], expected[seen], rtol=1e-12, atol=1e-12)
    assert not output[~seen].any() and (~seen).sum() == 3
    with pytest.raises(ValueError, match="needs segments="):
        model_scoring.segment_attention(None, query, key, value, None)


def test_verifier_one_pass_equals_each_prompt_alone(tokenizer):
    model = causal_lm(tokenizer)
    verifier = GenerativeVerifier(model, tokenizer, batch_size=16)
    calls = count_forwards(model)
    scores = verifier(QUESTIONS, ANSWERS)
    assert len(calls) == 1
    for row, (question, sentences) in enumerate(zip(QUESTIONS, ANSWERS)):
        context, steps, judge = verifier._pieces(question, sentences)
        for step in range(len(steps)):
            prompt = context + [token for piece in steps[:step + 1] for token in piece] + judge
            logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
            pair = torch.softmax(logits[[verifier.yes_id, verifier.no_id]], -1)
            assert scores[row][step] == pytest.approx(pair[0].item(), abs=1e-5)


def test_verifier_uses_no_deprecated_transformers_api(tokenizer, monkeypatch):
    """transformers 5.25 renamed ``past_key_values`` to ``cache`` (removed in 5.40): its deprecation goes through
    ``warnings`` (the forward's keyword) and ``logger.warning_once`` (the output's attribute)."""
    from transformers.utils import generic

    logged = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda message, *args, **kwargs: logged.append(message))
    model = causal_lm(tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for mode in ("one_pass", "cache", "batched"):
            GenerativeVerifier(model, tokenizer, mode=mode)(QUESTIONS[:2], ANSWERS[:2])
    assert not caught and not logged, ([str(warning.message) for warning in caught], logged)


def test_verifier_refuses_before_any_forward(tokenizer):
    falcon = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4)).eval()
    calls = count_forwards(falcon)
    with pytest.raises(ValueError, match="attention interface, which FalconForCausalLM does not take.*mode='cache'"):
        GenerativeVerifier(falcon, tokenizer)
    GenerativeVerifier(falcon, tokenizer, mode="cache")      # the fallback takes any attention implementation
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8)).eval()
    count_forwards(gemma, calls)
    with pytest.raises(ValueError, match="soft-cap.*attn_logit_softcapping=50.0.*mode='cache'"):
        GenerativeVerifier(gemma, tokenizer)
    model = causal_lm(tokenizer)
    verifier = GenerativeVerifier(model, tokenizer)
    count_forwards(model, calls)
    model._supports_attention_backend = False                             # changed after construction
    with pytest.raises(ValueError, match="mode='cache'"):
        verifier(QUESTIONS, ANSWERS)
    short = causal_lm(tokenizer, max_position_embeddings=64)
    count_forwards(short, calls)
    with pytest.raises(ValueError, match="answer 2 needs .* tokens .*max_position_embeddings=64"):
        GenerativeVerifier(short, tokenizer, mode="cache")([QUESTION, QUESTION, QUESTION], [[], GOOD[:1], GOOD * 3])
    windowed = causal_lm(tokenizer, use_sliding_window=True, sliding_window=32, max_window_layers=0)
    count_forwards(windowed, calls)
    with pytest.raises(ValueError, match="sliding-window.*mode='cache'"):
        GenerativeVerifier(windowed, tokenizer)([QUESTION], [GOOD])
    for options, match in [(dict(mode="fast"), "mode must be one of"), (dict(batch_size=0), "batch_size"),
                           (dict(yes="Yes", no="Yesterday"), "same token")]:
        with pytest.raises(ValueError, match=match):
            GenerativeVerifier(model, tokenizer, **options)
    with pytest.raises(TypeError, match="reuse_cache"):
        GenerativeVerifier(model, tokenizer, reuse_cache=False)
    assert calls == []


def test_a_head_that_is_not_linear_runs_the_whole_model(tokenizer, monkeypatch):
    model = causal_lm(tokenizer)
    expected = GenerativeVerifier(model, tokenizer)(QUESTIONS, ANSWERS)

    def soft_capped(model):
        raise NotImplementedError("soft-capped logits")
    monkeypatch.setattr(model_scoring, "output_projection", soft_capped)
    for mode in ("one_pass", "cache", "batched"):
        assert_scores_close(GenerativeVerifier(model, tokenizer, mode=mode)(QUESTIONS, ANSWERS), expected)


def prm_prefix_scores(model, prm, question, sentences):
    """Each step's score from its own prefix (context, steps and tags up to it), one full forward each."""
    scores = []
    tokens, tags = prm._tokens(question, sentences)
    for tag in tags:
        logits = model(input_ids=torch.tensor([tokens[:tag + 1]])).logits[0, -1].double()
        pair = logits[list(prm.pair)]
        scores.append(torch.softmax(pair, -1)[0].item())
    return scores


def test_prm_causal_lm_head_equals_each_prefix_alone(tokenizer):
    model = causal_lm(tokenizer)
    prm = ProcessRewardModel(model, tokenizer, step_tag=TAG, good_token="+", bad_token="-", batch_size=2)
    calls = count_forwards(model)
    scores = prm(QUESTIONS, ANSWERS)
    assert len(calls) == 3                                         # ceil(5 answers with steps / 2)
    expected = [prm_prefix_scores(model, prm, question, sentences)
                for question, sentences in zip(QUESTIONS, ANSWERS)]
    assert_scores_close(scores, expected)
    good, bad = tokenizer.encode("+"), tokenizer.encode("-")
    assert prm.pair == good + bad
    assert all(0 < score < 1 for row in scores for score in row)


def test_prm_classification_head_equals_each_prefix_alone(tokenizer):
    torch.manual_seed(1)
    model = transformers.Qwen2ForTokenClassification(config(tokenizer, num_labels=2, pad_token_id=1)).eval()
    prm = ProcessRewardModel(model, tokenizer, step_tag=TAG, label_ids=(0, 1), batch_size=3)
    calls = count_forwards(model)
    scores = prm(QUESTIONS, ANSWERS)
    assert len(calls) == 2                                         # ceil(5 answers with steps / 3)
    expected = [prm_prefix_scores(model, prm, question, sentences)
                for question, sentences in zip(QUESTIONS, ANSWERS)]
    assert_scores_close(scores, expected)
    # the good class is the second: P(class 1) of the two-class softmax; swapped labels give 1 - score
    swapped = ProcessRewardModel(model, tokenizer, step_tag=TAG, label_ids=(1, 0))(QUESTIONS, ANSWERS)
    assert_scores_close(swapped, [[1 - score for score in row] for row in scores])


def test_prm_refuses_before_any_forward(tokenizer):
    model = causal_lm(tokenizer, max_position_embeddings=64)
    calls = count_forwards(model)
    for options, match in [(dict(step_tag="ки", good_token="+", bad_token="-"), "step_tag='ки' must be exactly one"),
                           (dict(step_tag=TAG, good_token="+ Yes", bad_token="-"), "good_token"),
                           (dict(step_tag=TAG, good_token="+", bad_token="+"), "same token"),
                           (dict(step_tag=TAG, good_token="+"), "good_token and bad_token"),
                           (dict(step_tag=TAG, good_token="+", bad_token="-", label_ids=(0, 1)), "excludes"),
                           (dict(step_tag=TAG, label_ids=(0, 0)), "two distinct"),
                           (dict(step_tag=TAG, label_ids=(0, 1), batch_size=-1), "batch_size")]:
        with pytest.raises(ValueError, match=match):
            ProcessRewardModel(model, tokenizer, **options)
    classifier = transformers.Qwen2ForTokenClassification(config(tokenizer, num_labels=2))
    with pytest.raises(ValueError, match="num_labels=2"):
        ProcessRewardModel(classifier, tokenizer, step_tag=TAG, label_ids=(0, 2))
    prm = ProcessRewardModel(model, tokenizer, step_tag=TAG, good_token="+", bad_token="-")
    with pytest.raises(ValueError, match="answer 1 needs .* max_position_embeddings=64"):
        prm([QUESTION, QUESTION], [GOOD[:1], GOOD * 6])
    assert calls == []


def test_min_form_on_a_term_and_on_a_composite(tokenizer):
    def term(questions, answers, references):
        table = {"a": 0.9, "b": 0.2, "c": 0.5, "d": 1.0}
        return [[table[sentence] for sentence in sentences] for sentences in answers]

    answers = [["a", "b", "c"], ["d", "c"], [], ["c", "d", "b", "a"]]
    assert MinForm(term)(["q"] * 4, answers) == [[0.9, 0.2, 0.2], [1.0, 0.5], [], [0.5, 0.5, 0.2, 0.2]]
    composite = CompositeReward({"term": term, "min": MinForm(term)}, {"term": 0.5, "min": 0.5})
    rewards = composite(["q"] * 4, answers)
    assert rewards[0].tolist() == pytest.approx([0.9, 0.2, 0.35, 0.0])
    wrapped = MinForm(composite)(["q"] * 4, answers)
    assert wrapped.shape == (4, 4) and wrapped.dtype == torch.float32
    torch.testing.assert_close(wrapped, torch.tensor([[0.9, 0.2, 0.2, 0], [1.0, 0.5, 0, 0], [0, 0, 0, 0],
                                                      [0.5, 0.5, 0.2, 0.2]]))
    assert set(MinForm(composite).breakdown) == {"term", "min"}
    with pytest.raises(TypeError, match="callable"):
        MinForm(0.5)
    # min-form over a model term, inside a composite
    prm = ProcessRewardModel(causal_lm(tokenizer), tokenizer, step_tag=TAG, good_token="+", bad_token="-")
    raw = prm(QUESTIONS, ANSWERS)
    composite = CompositeReward({"prm": MinForm(prm), "format": FormatReward()}, {"prm": 0.7, "format": 0.3})
    composite(QUESTIONS, ANSWERS)
    for row, scores in enumerate(raw):
        running = [min(scores[:step + 1]) for step in range(len(scores))]
        assert composite.breakdown["prm"][row, :len(scores)].tolist() == pytest.approx(running, abs=1e-6)


def test_with_term_scales_the_other_weights():
    composite = CompositeReward({"a": FormatReward(), "b": FormatReward()}, {"a": 0.75, "b": 0.25})
    extended = composite.with_term("c", FormatReward(), 0.2)
    assert extended.weights == pytest.approx({"a": 0.6, "b": 0.2, "c": 0.2})
    assert composite.weights == {"a": 0.75, "b": 0.25}
    with pytest.raises(ValueError, match="already"):
        composite.with_term("a", FormatReward(), 0.2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        composite.with_term("c", FormatReward(), 0.0)


def test_step_scorers_from_local_folders_in_sgrpo_train(tmp_path, capsys):
    """``--step-scorer`` loads saved models as terms of the task's composite (``with_step_scorers``, also the verl
    plugin's), trains a step with them and logs their breakdown; a tag the scorer's tokenizer cannot encode as
    one token ends the command with one line."""
    import json

    from sgrpo_kernels.cli.console import main
    from sgrpo_kernels.rewards.loading import load_step_scorer, with_step_scorers
    from sgrpo_kernels.trainer.tasks import arith
    from sgrpo_kernels.trainer.tiny import char_tokenizer, save_pretrained, tiny_model

    tokenizer = char_tokenizer()
    policy, classifier = tmp_path / "policy", tmp_path / "classifier"
    save_pretrained(tiny_model(tokenizer, hidden_size=32, layers=1, heads=2), tokenizer, str(policy))
    torch.manual_seed(0)
    head = transformers.Qwen2ForTokenClassification(config(tokenizer, num_labels=2, pad_token_id=0))
    save_pretrained(head, tokenizer, str(classifier))
    reward = with_step_scorers(arith.reward(), [f"prm={classifier},step_tag=?",
                                                f"verifier={policy},yes=Yes,no=No,weight=0.5"])
    assert isinstance(reward.components["prm"], ProcessRewardModel) and reward.components["prm"].classifier
    assert reward.weights == pytest.approx({"correctness": 0.35 / 2, "logic": 0.21 / 2, "format": 0.14 / 2,
                                            "prm": 0.15, "verifier": 0.5})
    rewards = reward(["Compute 1 + 2."], [["1 + 2 = 3.", " Answer: 3"]], ["3"])
    assert rewards.shape == (1, 2) and ((reward.breakdown["prm"] > 0) & (reward.breakdown["prm"] < 1)).all()
    with pytest.raises(ValueError, match="step_tag='ки' must be exactly one token"):
        load_step_scorer("prm", str(policy))                        # Math-Shepherd's default tag
    common = ["train", "--model", policy, "--task", "arith-small", "--data-dir", tmp_path / "data", "--eval-size", "2",
              "--steps", "1", "--group-size", "2", "--prompts", "2", "--output-dir"]
    with pytest.raises(SystemExit) as refusal:
        main([*map(str, common), str(tmp_path / "refused"), "--step-scorer", f"prm={policy}"])
    assert refusal.value.code == 2 and str(refusal.value).startswith("sgrpo train: error: --step-scorer: step_tag=")
    capsys.readouterr()
    main([*map(str, common), str(tmp_path / "run"), "--step-scorer", f"prm={policy},step_tag=?"])
    record = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line][0]
    assert 0 < record["reward_prm"] < 1 and "reward_logic" in record
