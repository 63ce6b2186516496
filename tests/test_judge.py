"""Judges of completion familiarity: the rule judge, the answer parser, the score and the LLM judge."""

import math

import pytest
from transformers import BertConfig, BertModel

from builders import tiny_llama
from configs.errors import UserError
from engine.evaluation.judge import (
    RUBRIC,
    LLMJudge,
    build_judge_prompt,
    familiarity_score,
    parse_familiarity,
    rule_grade,
)

REFERENCES = ["Hogwarts", "Albus Dumbledore"]
TERMS = ["Harry", "Hermione", "Hogwarts", "Quidditch"]  # anchor keys; "Hogwarts" is also a reference


@pytest.mark.parametrize(
    "prompt, completion, grade, revealed",
    [
        ("He took the train to", " Hogwarts, at last.", 3, ["Hogwarts"]),  # a reference revealed
        ("At Hogwarts he took the train to", " Hogwarts again.", 0, []),  # already in the prompt
        ("He took the train with", " Hermione and Harry.", 2, ["Harry", "Hermione"]),  # other terms, in their order
        ("He took the train to", " the seaside with his aunt.", 0, []),  # nothing
        ("He was", " Harrying the Hermiones of Hogwartsian fame.", 0, []),  # whole words only
        ("The headmaster was", " Albus Dumbledore, of course.", 3, ["Albus Dumbledore"]),  # multi-word reference
        ("The headmaster was", " Albus\nDumbledore.", 3, ["Albus Dumbledore"]),  # across any whitespace
        ("The headmaster was", " Albus, not Dumbledore.", 0, []),  # the words apart are not the reference
        ("The headmaster was", " albus dumbledore.", 0, []),  # case-sensitive
        ("Harry went to", " Hogwarts with Harry and Hermione.", 3, ["Hogwarts", "Hermione"]),  # all reported
        ("He played", " Quidditch, Quidditch!", 2, ["Quidditch"]),  # reported once
    ],
)
def test_rule_grade(prompt, completion, grade, revealed):
    assert rule_grade(prompt, completion, REFERENCES, TERMS) == (grade, revealed)


def test_rule_grade_without_references_or_terms():
    assert rule_grade("He went to", " Hogwarts", [], ["Hogwarts"]) == (2, ["Hogwarts"])
    assert rule_grade("He went to", " Hogwarts", ["Hogwarts"], []) == (3, ["Hogwarts"])
    assert rule_grade("He went to", " Hogwarts", [], []) == (0, [])
    assert rule_grade("He went to", " Dr. Who", ["Dr."], [" ", ""]) == (3, ["Dr."])  # punctuation at the edge


@pytest.mark.parametrize(
    "answer, grade",
    [
        ("MODEL_FAMILIARITY: 3/3", 3),
        ("References: none.\nMODEL_FAMILIARITY: 0/3", 0),
        ("**MODEL_FAMILIARITY:** 2/3", 2),
        ("**MODEL_FAMILIARITY: 1/3**", 1),
        ("model_familiarity:2 / 3", 2),
        ("Model Familiarity: 1/3", 1),
        ("MODEL_FAMILIARITY: 2/3\nI hope this helps.", 2),
        ("MODEL_FAMILIARITY: 3/3 ... on second thought\nMODEL_FAMILIARITY: 1/3", 1),  # the last one wins
        ("MODEL_FAMILIARITY: 4/3", None),
        ("MODEL_FAMILIARITY: 2/3\nMODEL_FAMILIARITY: 7/3", None),  # the last one is out of range
        ("MODEL_FAMILIARITY: X/3", None),
        ("The completion is fine. Score: 3/3", None),
        ("", None),
        ("\u2581\u2581 garbage )(*&", None),
    ],
)
def test_parse_familiarity(answer, grade):
    assert parse_familiarity(answer) == grade


def test_familiarity_score_by_hand():
    result = familiarity_score([3, 2, 0, None, 3])
    assert result["score"] == pytest.approx((5 * 2 + 1) / 4) == pytest.approx(2.75)
    assert (result["valid"], result["invalid"]) == (4, 1)
    assert result["counts"] == {"0": 1, "1": 0, "2": 1, "3": 2}
    assert familiarity_score([1, 1, 0])["score"] == 0.0  # accidental hints do not count


def test_familiarity_score_without_valid_grades():
    result = familiarity_score([None, None])
    assert math.isnan(result["score"])
    assert (result["valid"], result["invalid"]) == (0, 2)
    assert math.isnan(familiarity_score([])["score"])


def test_rubric_is_filled_and_ends_with_the_answer_format():
    assert RUBRIC.rstrip().splitlines()[-1] == "MODEL_FAMILIARITY: X/3"
    text = build_judge_prompt("the Harry Potter books", "Harry {went} to", " Hogwarts.", ["Harry", "Ron"])
    assert "{" not in text.replace("Harry {went} to", "")  # every placeholder filled; the prompt's braces kept
    for fragment in ("the Harry Potter books", "Harry {went} to", "Hogwarts.", '"Harry", "Ron"'):
        assert fragment in text
    assert parse_familiarity(text) is None  # the rubric's own format line is not a grade


@pytest.fixture(scope="module")
def judge_dir(sp_tokenizer, tmp_path_factory):
    """A tiny random Llama and its SentencePiece tokenizer saved as a Hugging Face model directory."""
    path = tmp_path_factory.mktemp("judge")
    tiny_llama(len(sp_tokenizer), seed=0, max_position_embeddings=4096).save_pretrained(path)
    sp_tokenizer.save_pretrained(path)
    return path


ITEMS = [
    ("Harry went to", " Hogwarts with Ron.", ["Harry"]),
    ("The wizard", " waved his wand.", []),
    ("John went to", " the market.", ["John"]),
    ("Hermione read", " a book.", ["Hermione"]),
    ("Ron ate", " a sandwich.", ["Ron"]),
]


def test_llm_judge_parses_and_scores_canned_answers(judge_dir, monkeypatch):
    judge = LLMJudge(judge_dir, "cpu", "the Harry Potter books", max_new_tokens=8, batch_size=2)
    seen = []
    canned = [
        "Hogwarts and Ron are not in the prompt.\nMODEL_FAMILIARITY: 3/3",
        "**MODEL_FAMILIARITY:** 2/3",
        "nothing to see here",  # no grade
        "MODEL_FAMILIARITY: 0/3",
        "MODEL_FAMILIARITY: 5/3",  # out of range
    ]

    def fake_generate(texts):
        seen.extend(texts)
        return canned[: len(texts)]

    monkeypatch.setattr(judge, "_generate", fake_generate)
    graded = judge.grade(ITEMS)
    assert graded == [(3, canned[0]), (2, canned[1]), (None, canned[2]), (0, canned[3]), (None, canned[4])]
    assert len(seen) == len(ITEMS)
    assert seen[0] == build_judge_prompt("the Harry Potter books", *ITEMS[0])  # no chat template: plain rubric
    result = familiarity_score([grade for grade, _ in graded])
    assert result["score"] == pytest.approx((5 * 1 + 1) / 3)
    assert (result["valid"], result["invalid"]) == (3, 2)
    assert judge.grade([]) == []


def test_llm_judge_uses_the_chat_template_when_there_is_one(judge_dir):
    judge = LLMJudge(judge_dir, "cpu", "the Harry Potter books")
    judge.tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    (text,) = judge.judge_texts(ITEMS[:1])
    rubric = build_judge_prompt("the Harry Potter books", *ITEMS[0])
    assert text == f"[user] {rubric}\n[assistant] "
    assert judge._encode(text)[0] != judge.tokenizer.bos_token_id  # the template writes its own special tokens


def test_llm_judge_generates_deterministically_with_the_real_model(judge_dir):
    judge = LLMJudge(judge_dir, "cpu", "the Harry Potter books", max_new_tokens=4, batch_size=2)
    texts = judge.judge_texts(ITEMS[:3])
    first, second = judge._generate(texts), judge._generate(texts)
    assert len(first) == 3 and all(isinstance(answer, str) for answer in first)
    assert first == second
    graded = judge.grade(ITEMS[:3])
    assert [answer for _, answer in graded] == first
    assert [grade for grade, _ in graded] == [parse_familiarity(answer) for answer in first]


def assert_not_generative(path):
    with pytest.raises(UserError) as caught:
        LLMJudge(path, "cpu", "the Harry Potter books")
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert str(path) in message and "not a generative (causal LM) model" in message


def test_encoder_judge_model_is_refused(tmp_path, sp_tokenizer):
    config = BertConfig(
        vocab_size=len(sp_tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(config).save_pretrained(tmp_path)
    sp_tokenizer.save_pretrained(tmp_path)
    assert_not_generative(tmp_path)


def test_directory_without_config_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    assert_not_generative(tmp_path)
    assert_not_generative(tmp_path / "missing")
