"""Sentence rewards on real inputs, English and Chinese: correctness, logic, format, composite, verifier."""

import shutil

import pytest
import torch
from cases import train_byte_level_bpe

from sgrpo_kernels.rewards import (
    ANSWER_LINE,
    THINK_BLOCK,
    CodeTestCorrectness,
    CompositeReward,
    FormatReward,
    GenerativeVerifier,
    MathStepCorrectness,
    NumberProvenanceLogic,
    SandboxUnavailableError,
    answers_match,
    equation_holds,
    equations,
    extract_code,
    safe_eval,
    sandbox,
)

QUESTION = "Tom has 12 apples and buys 30 more. He gives away 7. How many apples does he have?"
GOOD = ["Tom starts with 12 apples.", " He buys 30, so 12 + 30 = 42.", " He gives 7 away: 42 - 7 = 35.",
        "\nAnswer: 35"]
BAD = ["Tom starts with 12 apples.", " He buys 30, so 12 + 30 = 43.", " Then 43 - 9 = 34.", "\nAnswer: 34"]
QUESTION_ZH = "小明有 12 个苹果，又买了 30 个，送出 7 个。还剩几个？"
GOOD_ZH = ["小明有 12 个苹果。", "再买 30 个，12 + 30 = 42。", "送出 7 个，42 − 7 = 35。", "\n答案：35"]
BAD_ZH = ["小明有 12 个苹果。", "再买 30 个，12 × 30 = 42。", "送出 7 个，42 − 7 = 35。", "\n答案：３６"]


def test_safe_eval_computes_arithmetic_and_refuses_everything_else():
    assert safe_eval("(2 + 3) × 4 − 6 ÷ 3") == 18.0
    assert safe_eval("2^10") == 1024.0 and safe_eval("7 // 2 + 7 % 2") == 4.0
    for hostile in ("__import__('os').system('true')", "x + 1", "(1).__class__", "9 ** 999999", "1 / 0", "[1] * 9"):
        assert safe_eval(hostile) is None


def test_equations_in_sentences():
    assert equations("so 12 + 30 = 42.") == [["12 + 30", "42"]]
    assert equations("(2+3)×4 = 20 = 4×5 and 10 / 3 = 3.33") == [["(2+3)×4", "20", "4×5"], ["10 / 3", "3.33"]]
    assert equations("Let x = 5 and 2x = 10") == []          # a variable is not arithmetic
    assert equation_holds(["10 / 3", "3.33"]) and not equation_holds(["10 / 3", "3.4"])
    assert equation_holds(["2x", "10"]) is None


@pytest.mark.parametrize("question,answer,reference,expected", [
    (QUESTION, GOOD, "35", [0.5, 1.0, 1.0, 1.0]),
    (QUESTION, BAD, "35", [0.5, 0.0, 1.0, 0.0]),             # 43 - 9 = 34 holds, the 43 and the answer do not
    (QUESTION_ZH, GOOD_ZH, "35", [0.5, 1.0, 1.0, 1.0]),
    (QUESTION_ZH, BAD_ZH, "35", [0.5, 0.0, 1.0, 0.0]),       # 12 × 30 ≠ 42; ３６ is not 35
])
def test_math_step_correctness(question, answer, reference, expected):
    assert MathStepCorrectness()([question], [answer], [reference]) == [expected]


def test_final_answer_uses_math_verify():
    assert answers_match("\\frac{1}{2}", "The answer is 0.5")
    assert answers_match("42", "答案：４２") and answers_match("42", "Answer:42")
    assert not answers_match("42", "Answer: 41")
    assert MathStepCorrectness(neutral=0.25)(["q"], [["We think.", " The answer is $\\frac{3}{6}$."]], ["0.5"]) == [
        [0.25, 1.0]]


def test_number_provenance_logic():
    assert NumberProvenanceLogic()([QUESTION], [GOOD]) == [[1.0, 1.0, 1.0, 1.0]]
    # 43 - 9: 43 appeared in an earlier step, 9 never did; the final 34 was computed just before
    assert NumberProvenanceLogic()([QUESTION], [BAD]) == [[1.0, 1.0, 0.5, 1.0]]
    assert NumberProvenanceLogic()([QUESTION], [GOOD[:2] + ["\nAnswer: 36"]]) == [[1.0, 1.0, 0.0]]
    assert NumberProvenanceLogic()([QUESTION_ZH], [GOOD_ZH]) == [[1.0, 1.0, 1.0, 1.0]]


def test_format_reward():
    reward = FormatReward(step_pattern=r"=", whole_weight=0.5)
    # step 0 has no equation; the last sentence is an "Answer:" line; the whole answer has one
    assert reward([QUESTION], [GOOD]) == [[0.5, 1.0, 1.0, 1.0]]
    no_answer_line = GOOD[:3] + [" So 35."]
    assert reward([QUESTION], [no_answer_line]) == [[0.0, 0.5, 0.5, 0.0]]
    assert FormatReward(final_pattern=None, answer_patterns=(THINK_BLOCK, ANSWER_LINE))(
        ["q"], [["<think>12 + 30 = 42", "</think>", "\n答案：42"]]) == [[1.0, 1.0, 1.0]]


def test_composite_reward_and_breakdown():
    composite = CompositeReward({"correctness": MathStepCorrectness(), "logic": NumberProvenanceLogic(),
                                 "format": FormatReward()}, {"correctness": 0.5, "logic": 0.3, "format": 0.2})
    rewards = composite([QUESTION, QUESTION_ZH], [GOOD, BAD_ZH[:3]], ["35", "35"])
    assert rewards.shape == (2, 4) and rewards.dtype == torch.float32
    assert set(composite.breakdown) == {"correctness", "logic", "format"}
    expected = sum(weight * composite.breakdown[name] for name, weight in composite.weights.items())
    torch.testing.assert_close(rewards, expected)
    assert rewards[1, 3] == 0.0 and (composite.breakdown["correctness"][1, :3] == torch.tensor([0.5, 0.0, 1.0])).all()
    assert composite.num_sentences([GOOD, BAD_ZH[:3]]).tolist() == [4, 3]


def test_composite_validates():
    with pytest.raises(ValueError, match="sum to 1"):
        CompositeReward({"a": FormatReward()}, {"a": 0.7})
    with pytest.raises(ValueError, match="exactly the components"):
        CompositeReward({"a": FormatReward()}, {"b": 1.0})
    out_of_range = CompositeReward({"bad": lambda questions, answers, references: [[2.0] for _ in answers]}, {"bad": 1})
    with pytest.raises(ValueError, match="'bad' gave 2.0"):
        out_of_range(["q"], [["one sentence"]])
    wrong_length = CompositeReward({"short": lambda questions, answers, references: [[] for _ in answers]},
                                   {"short": 1.0})
    with pytest.raises(ValueError, match="'short' gave 0 scores"):
        wrong_length(["q"], [["one sentence"]])


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
def test_code_correctness_runs_tests_in_the_sandbox():
    answer = ["Read two numbers and print their sum.", "\n```python\na, b = map(int, input().split())\n",
              "print(a + b)\n```"]
    tests = [{"stdin": "1 2", "stdout": "3"}, {"stdin": "10 -4", "stdout": "6"}, {"stdin": "2 2", "stdout": "5"},
             {"assert": "assert True"}]
    assert extract_code("".join(answer)) == "a, b = map(int, input().split())\nprint(a + b)\n"
    # the "assert" test runs the program with no input: input() fails, so it does not pass
    assert CodeTestCorrectness(timeout_s=10)(["sum"], [answer], [tests]) == [[0.5, 0.5, 0.5]]
    looping = ["```python\nwhile True:\n    pass\n```"]
    assert CodeTestCorrectness(timeout_s=1)(["loop"], [looping], [[{"stdin": "", "stdout": ""}]]) == [[0.0]]


def test_code_correctness_without_bubblewrap_fails_at_construction_unless_told_it_is_unsafe(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox, "_warned_without_bwrap", False)
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap.*unsafe_allow_without_sandbox"):
        CodeTestCorrectness()
    with pytest.warns(RuntimeWarning, match="UNSAFE"):
        reward = CodeTestCorrectness(timeout_s=10, unsafe_allow_without_sandbox=True)
    answer = ["Print the sum.", "\n```python\nprint(sum(map(int, input().split())))\n```"]
    tests = [{"stdin": "1 2", "stdout": "3"}, {"stdin": "2 2", "stdout": "5"}]
    assert reward(["sum"], [answer], [tests]) == [[0.5, 0.5]]


MODEL_CORPUS = [QUESTION, "".join(GOOD), "".join(BAD), "Question: Solution steps: Is the last step above correct "
                "and logically valid? Answer Yes or No: Yes No"]


@pytest.fixture(scope="module")
def verifier_parts():
    transformers = pytest.importorskip("transformers", reason="the verifier runs a transformers causal LM")
    tokenizer = train_byte_level_bpe(MODEL_CORPUS, vocab_size=400)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.Qwen2ForCausalLM(config).double().eval(), tokenizer


def test_verifier_modes_agree_in_float64(verifier_parts):
    model, tokenizer = verifier_parts
    questions, answers = [QUESTION, QUESTION, QUESTION_ZH], [GOOD, BAD[:2], GOOD_ZH]
    one_pass = GenerativeVerifier(model, tokenizer, batch_size=2)(questions, answers)
    cached = GenerativeVerifier(model, tokenizer, mode="cache")(questions, answers)
    batched = GenerativeVerifier(model, tokenizer, mode="batched", batch_size=5)(questions, answers)
    single = GenerativeVerifier(model, tokenizer, mode="batched", batch_size=1)(questions, answers)
    assert [len(scores) for scores in one_pass] == [4, 2, 4]
    for row in range(3):
        for scores in (one_pass, cached, batched):
            assert scores[row] == pytest.approx(single[row], abs=1e-10)
    assert all(0.0 < score < 1.0 for scores in one_pass for score in scores)
    assert len({round(score, 9) for scores in one_pass for score in scores}) > 3    # the steps are told apart


def test_verifier_score_is_yes_over_yes_plus_no(verifier_parts):
    model, tokenizer = verifier_parts
    verifier = GenerativeVerifier(model, tokenizer, context_template="Q: {question}\n", judge_template=" ok?")
    prompt = (tokenizer.encode("Q: " + QUESTION + "\n") + tokenizer.encode(GOOD[0]) + tokenizer.encode(GOOD[1])
              + tokenizer.encode(" ok?"))
    logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    probabilities = torch.softmax(logits.double(), -1)
    expected = probabilities[verifier.yes_id] / (probabilities[verifier.yes_id] + probabilities[verifier.no_id])
    assert verifier([QUESTION], [GOOD[:2]])[0][1] == pytest.approx(expected.item(), rel=1e-10)
