"""Anchor dictionaries: validation (one-line errors naming file and key), the authors' filtering, suggestions."""

import json

import pytest

from builders import byte_bpe_tokenizer, tiny_llama
from engine.data.anchors import Anchors, filter_terms, load_anchors, suggest_anchors, write_suggestions
from configs.errors import UserError


def test_yaml_and_json_dictionaries(tmp_path):
    (tmp_path / "a.yaml").write_text("Harry: [Jon, John]\nHogwarts: Mystic Academy\n")
    (tmp_path / "a.json").write_text(json.dumps({"Harry": ["Jon", "John"], "Hogwarts": "Mystic Academy"}))
    expected = {"Harry": ["Jon", "John"], "Hogwarts": ["Mystic Academy"]}
    assert load_anchors(tmp_path / "a.yaml") == Anchors(expected, [])
    assert load_anchors(tmp_path / "a.json") == Anchors(expected, [])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.yaml", "Harry: [Jon]\nRon: [Tom]\nHarry: [John]\n", "duplicate key 'Harry'"),
        ("a.json", '{"Harry": ["Jon"], "Harry": ["John"]}', "duplicate key 'Harry'"),
        ("a.yaml", "- Harry\n- Ron\n", "top level must be a mapping"),
        ("a.yaml", "{}\n", "empty"),
        ("a.json", "{}", "empty"),
        ("a.yaml", "'': [Jon]\n", "key '' must be a non-empty string"),
        ("a.yaml", "12: [Jon]\n", "key 12 must be a non-empty string"),
        ("a.yaml", "Harry: []\n", "key 'Harry': translations must be"),
        ("a.yaml", "Harry: [Jon, '']\n", "key 'Harry': translations must be"),
        ("a.yaml", "Harry:\n", "key 'Harry': translations must be"),
        ("a.json", '{"Harry": {"to": "Jon"}}', "key 'Harry': translations must be"),
        ("a.yaml", "Harry: [Jon\n", "cannot parse"),
        ("a.json", '{"Harry": ["Jon"],}', "cannot parse"),
        ("a.txt", "Harry: [Jon]\n", "must be .yaml, .yml or .json"),
        ("missing.yaml", None, "not found"),
    ],
)
def test_errors_are_one_line_and_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as error:
        load_anchors(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_filtering_drops_split_keys_and_possessives():
    terms = {
        "Harry": ["Jon"], "Potter": ["Smith"], "Harry Potter": ["Jon Smith"], "Harry's": ["Jon's"],
        "Potter’s": ["Smith’s"], "Ron Weasley": ["Tom Brown"], "Hermione's": ["Anna's"],
    }
    anchors = filter_terms(terms)
    # "Ron Weasley" stays: "Weasley" is not a key. "Hermione's" stays: "Hermione" is not a key.
    assert list(anchors.terms) == ["Harry", "Potter", "Ron Weasley", "Hermione's"]
    assert anchors.dropped == [
        ("Harry Potter", "splits into keys Harry + Potter"),
        ("Harry's", "possessive of key 'Harry'"),
        ("Potter’s", "possessive of key 'Potter'"),
    ]


TARGET = (
    "Zorbin raised the glimmerwand and Zorbin smiled at Quillhaven Castle. "
    "The owls of Quillhaven Castle watched Zorbin and the glimmerwand. "
    "Mira Vellow laughed, and Mira Vellow ran to the tower. "
) * 5
GENERAL = (
    "The farmer walked to the market with his basket. Peter sold bread and Mary bought apples. "
    "The teacher opened the window and the children sang. Anna read a book in the garden. "
    "The tower of the town was old and the castle was empty. Peter and Anna smiled. They saw the Old Castle. "
) * 5


def test_suggest_finds_over_represented_terms_and_writes_a_loadable_dictionary(tmp_path):
    tokenizer = byte_bpe_tokenizer([TARGET, GENERAL], vocab_size=400)
    baseline, reinforced = tiny_llama(len(tokenizer), 0), tiny_llama(len(tokenizer), 1)
    suggestions = suggest_anchors([TARGET], [GENERAL], tokenizer, baseline, reinforced, top_k=6, probe_length=32)
    # The six terms seen 10+ times in the target and never in the general corpus. "Mira Vellow" is left out
    # because both its words are terms; "Quillhaven Castle" is not ("Castle" is common in general text).
    assert set(suggestions) == {"Zorbin", "glimmerwand", "Quillhaven", "Quillhaven Castle", "Mira", "Vellow"}
    zorbin = suggestions["Zorbin"]
    assert zorbin["target_count"] == 15 and zorbin["general_count"] == 0
    assert len(zorbin["translations"]) == 3 and set(zorbin["translations"]) <= {"Peter", "Mary", "Anna"}
    assert all(t.islower() for t in suggestions["glimmerwand"]["translations"])

    path = tmp_path / "suggested.yaml"
    write_suggestions(suggestions, path)
    text = path.read_text()
    assert text.startswith("# Machine-suggested") and "REVIEW" in text
    assert all(line.startswith("#") or "  # score " in line for line in text.splitlines())
    loaded = load_anchors(path)
    assert loaded.terms == {term: entry["translations"] for term, entry in suggestions.items()}
