"""Generic labels: translation + position map + forbidden tokens by hand, mixing by hand, then end to end."""

import random

import pytest
import torch

import kernels
from builders import byte_bpe_tokenizer, tiny_llama, word_tokenizer
from configs.schema import LabelConfig
from engine.data.corpus import make_blocks
from configs.errors import UserError
from engine.data.label_sets import LabelSet
from engine.data.translation import Translation, translate_block
from engine.methods.generic_labels import build_labels, labels_from_hidden
from engine.models import IGNORE_INDEX, check_head_gives_logits, check_same_vocabulary

WORKED_ANCHORS = {"Harry": ["Jon"], "Hogwarts": ["Mystic Academy"]}
WORKED_TEXT = "went to Hogwarts with Harry and Harry"


def one_block(text: str, tokenizer):
    [block] = make_blocks([text], tokenizer, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return block


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


# --------------------------------------------------------------------------------------------------
# translate_block


def test_worked_example_of_the_spec():
    tokenizer = word_tokenizer("went to Hogwarts with Harry and Mystic Academy Jon")
    t = translate_block(one_block(WORKED_TEXT, tokenizer), WORKED_ANCHORS, tokenizer, random.Random(0))
    assert t.translated_text == "went to Mystic Academy with Jon and Jon"
    assert tokens(tokenizer, t.translated_ids) == "went to Mystic Academy with Jon and Jon".split()
    # went→went, to→to (label "Mystic"), Hogwarts→Academy, with→with (label "Jon"), Harry→Jon,
    # and→-1 (precedes the second Harry), Harry→second Jon.
    assert t.position_map == [0, 1, 3, 4, 5, -1, 7]
    mystic, jon = tokenizer.convert_tokens_to_ids(["Mystic", "Jon"])
    # "Mystic" (translated position 2) forbidden from row 3 (Academy) on, "Jon" (5) from row 6 (and) on.
    assert t.forbidden == [[], [], [], [mystic], [mystic], [mystic], sorted([mystic, jon]), sorted([mystic, jon])]
    assert (t.matched, t.skipped, t.unaligned) == (3, 0, 0)


def test_multi_token_anchor_with_shorter_replacement_and_greedy_longest_match():
    tokenizer = word_tokenizer("Harry Potter met Ron at Hogwarts Jon Tom Mystic Academy")
    anchors = {"Harry": ["Tom"], "Harry Potter": ["Jon"], "Hogwarts": ["Mystic Academy"]}
    t = translate_block(one_block("Harry Potter met Ron at Hogwarts", tokenizer), anchors, tokenizer, random.Random(0))
    assert t.translated_text == "Jon met Ron at Mystic Academy"  # the longer key wins over "Harry"
    # Harry (inside the anchor) → -1, Potter (its last token) → Jon, then everything shifts by one.
    assert t.position_map == [-1, 0, 1, 2, 3, 5]
    assert t.matched == 2


def test_subword_anchors_with_sentencepiece(sp_tokenizer):
    block = one_block(WORKED_TEXT, sp_tokenizer)
    assert tokens(sp_tokenizer, block.input_ids) == [
        "▁went", "▁to", "▁H", "ogw", "ar", "ts", "▁with", "▁H", "ar", "ry", "▁and", "▁H", "ar", "ry",
    ]
    t = translate_block(block, WORKED_ANCHORS, sp_tokenizer, random.Random(0))
    assert tokens(sp_tokenizer, t.translated_ids) == [
        "▁went", "▁to", "▁M", "yst", "ic", "▁Ac", "ad", "emy", "▁with", "▁J", "on", "▁and", "▁J", "on",
    ]
    # Hogwarts (4 tokens) → Mystic Academy (6): its last token "ts" maps to "emy"; Harry (3) → Jon (2).
    assert t.position_map == [0, 1, -1, -1, -1, 7, 8, -1, -1, 10, -1, -1, -1, 13]
    m, j = sp_tokenizer.convert_tokens_to_ids(["▁M", "▁J"])
    assert t.forbidden == [[]] * 3 + [[m]] * 7 + [sorted([m, j])] * 4
    assert t.unaligned == 0


def test_repeated_anchor_only_first_translated_occurrence_keeps_the_token_before():
    # The first "Harry," sits inside one token ("Harry,"): skipped and left as is, so the second Harry is
    # the key's first translated occurrence and "and" keeps its mapping; the third one's "and" is ignored.
    tokenizer = word_tokenizer("with Harry, and Harry and Jon")
    block = one_block("with Harry, and Harry and Harry", tokenizer)
    t = translate_block(block, {"Harry": ["Jon"]}, tokenizer, random.Random(0))
    assert t.translated_text == "with Harry, and Jon and Jon"
    assert (t.matched, t.skipped) == (2, 1)
    assert t.position_map == [0, 1, 2, 3, -1, 5]
    jon = tokenizer.convert_tokens_to_ids("Jon")
    assert t.forbidden == [[], [], [], [], [jon], [jon]]


def test_forbid_anchor_keys_adds_the_original_terms_to_every_row():
    tokenizer = word_tokenizer("went to Hogwarts with Harry and Mystic Academy Jon")
    block = one_block(WORKED_TEXT, tokenizer)
    t = translate_block(block, WORKED_ANCHORS, tokenizer, random.Random(0), forbid_anchor_keys=True)
    hogwarts, harry, mystic, jon = tokenizer.convert_tokens_to_ids(["Hogwarts", "Harry", "Mystic", "Jon"])
    assert t.forbidden[0] == sorted([hogwarts, harry])
    assert t.forbidden[-1] == sorted([hogwarts, harry, mystic, jon])


def test_one_seeded_translation_per_key_per_block():
    tokenizer = word_tokenizer("Harry and A B C D E F")
    block = one_block("Harry and Harry and Harry", tokenizer)
    anchors = {"Harry": list("ABCDEF")}
    texts = {translate_block(block, anchors, tokenizer, random.Random(f"0:{i}")).translated_text for i in range(20)}
    assert all(len(set(text.split(" and "))) == 1 for text in texts)  # consistent inside a block
    assert len(texts) > 1  # different blocks may differ
    again = translate_block(block, anchors, tokenizer, random.Random("0:7"))
    assert again.translated_text == translate_block(block, anchors, tokenizer, random.Random("0:7")).translated_text


def test_byte_level_bpe_tokenizer():
    text = "Harry went to Hogwarts with Ron, and Harry's wand was magic."
    tokenizer = byte_bpe_tokenizer([text, "Jon went to Mystic Academy with Tom and the staff."] * 10)
    block = one_block(text, tokenizer)
    assert tokens(tokenizer, block.input_ids) == [
        "Harry", "Ġwent", "Ġto", "ĠHo", "gw", "ar", "ts", "Ġwith", "ĠRon", ",", "Ġand", "ĠHarry", "'s",
        "Ġwand", "Ġw", "as", "Ġmag", "ic", ".",
    ]
    anchors = {"Harry": ["Jon"], "Hogwarts": ["Mystic Academy"], "wand": ["staff"]}
    t = translate_block(block, anchors, tokenizer, random.Random(0))
    assert t.translated_text == "Jon went to Mystic Academy with Ron, and Jon's staff was magic."
    # " Jon" is inserted as a bare space token and "Jon": the space maps to nothing.
    assert tokens(tokenizer, t.translated_ids) == [
        "Jon", "Ġwent", "Ġto", "ĠMy", "st", "ic", "ĠAc", "ad", "em", "y", "Ġwith", "ĠRon", ",", "Ġand", "Ġ",
        "Jon", "'s", "Ġst", "af", "f", "Ġw", "as", "Ġmag", "ic", ".",
    ]
    assert t.position_map == [0, 1, 2, -1, -1, -1, 9, 10, 11, 12, -1, 15, 16, 19, 20, 21, 22, 23, 24]
    assert (t.matched, t.skipped, t.unaligned) == (4, 0, 0)
    # Forbidden: a replacement's first token without and with a leading space (the bare space skipped),
    # from the row after it starts: Jon from row 1, My/ĠMy from row 4, st/Ġst from row 18.
    jon, my, space_my, st, space_st = tokenizer.convert_tokens_to_ids(["Jon", "My", "ĠMy", "st", "Ġst"])
    assert t.forbidden == (
        [[]] + [[jon]] * 3 + [sorted([jon, my, space_my])] * 14 + [sorted([jon, my, space_my, st, space_st])] * 7
    )


# --------------------------------------------------------------------------------------------------
# Mixing: the reference kernel and the alignment around it, with hidden states that ARE the logits


def test_reference_kernel_by_hand():
    eye = torch.eye(4)
    b = torch.tensor([[0.0, 8, 4, 0], [2, 2, 0, 0], [3, 2.5, 0, 0]])
    r = torch.tensor([[0.0, 8, 4, 0], [2, 2, 0, 0], [5, 2.5, 0, 0]])
    forbidden = torch.tensor([[1], [-1], [-1]])
    labels = kernels.generic_labels(b, eye, r, eye, [0.1, 1.0], forbidden, impl="reference")
    # Row 0: forbidden id 1 would win; its logit becomes the row mean 3, so id 2 (4) wins (and the
    # reinforced excess 8 - 3 = 5 pushes id 1 further down). Row 1: a tie goes to the smallest id.
    # Row 2: the reinforced excess on id 0 is 2: 3 - 0.1·2 = 2.8 still wins, 3 - 1·2 = 1 loses to 2.5.
    assert labels.tolist() == [[2, 2], [0, 0], [0, 1]]


def test_labels_from_hidden_aligns_suppresses_mixes_and_shifts():
    eye = torch.eye(4)
    alphas = [0.25, 1.0]
    translations = [
        Translation([0] * 4, [0] * 4, [0, 2, -1, 3], [[], [], [], [1]], 0, 0, 0, ""),
        Translation([0] * 4, [0] * 2, [0, 1, -1, -1], [[], []], 0, 0, 0, ""),
    ]
    hidden_translated = torch.tensor([
        [[0.0, 1, 0, 0], [9, 9, 9, 9], [0, 0, 1, 2], [0, 5, 3, 0]],
        [[1.0, 0, 0, 0], [0, 0, 0, 1], [99, 0, 0, 0], [99, 0, 0, 0]],  # rows 2-3: padding, never read
    ])
    hidden_original = torch.tensor([
        [[0.0, 1, 0, 0], [0, 0, 1, 4], [7, 7, 7, 7], [0, 0, 0, 0]],
        [[1.0, 0, 0, 0], [0, 0, 0, 1], [7, 7, 7, 7], [7, 7, 7, 7]],
    ])
    labels = labels_from_hidden(translations, hidden_translated, hidden_original, eye, eye, alphas)
    # Block 0 before the shift: position 0 → 1 (no excess); 1 → baseline prefers 3 but the reinforced
    # model boosts it by 2: kept at α=0.25 (2 − 0.5 > 1), replaced by 2 at α=1; 2 → ignored;
    # 3 → id 1 is forbidden: 5 becomes the mean 2, so 2 (3) wins. Block 1: 0 → 0, 1 → 3, rest ignored.
    # After the shift, column i holds the label of position i − 1 and column 0 is ignored.
    I = IGNORE_INDEX
    assert labels.tolist() == [
        [[I, I], [1, 1], [3, 2], [I, I]],
        [[I, I], [0, 0], [3, 3], [I, I]],
    ]


# --------------------------------------------------------------------------------------------------
# build_labels end to end on random tiny models


@pytest.fixture(scope="module")
def labelled(sp_tokenizer):
    text = "Harry went to Hogwarts with Ron and Hermione. Harry saw the wand. " * 6
    blocks = make_blocks([text], sp_tokenizer, 16)
    anchors = {"Harry": ["Jon", "Henry"], "Hogwarts": ["Mystic Academy"], "wand": ["staff"]}
    baseline, reinforced = tiny_llama(len(sp_tokenizer), 0), tiny_llama(len(sp_tokenizer), 1)
    return blocks, anchors, baseline, reinforced


def test_build_labels_shapes_range_and_determinism(sp_tokenizer, labelled, tmp_path):
    blocks, anchors, baseline, reinforced = labelled
    cfg = LabelConfig(context_length=16, batch_size=2)
    result = build_labels(baseline, reinforced, sp_tokenizer, blocks, anchors, cfg, progress=False)
    assert result.input_ids.shape == (len(blocks), 16)
    assert result.labels.shape == (len(blocks), 16, 3) and result.alphas == [2.5, 5.0, 10.0]
    assert (result.labels[:, 0] == IGNORE_INDEX).all()
    valid = result.labels[result.labels != IGNORE_INDEX]
    assert valid.numel() and valid.min() >= 0 and valid.max() < len(sp_tokenizer)
    stats = result.stats
    assert stats["blocks"] == len(blocks) and stats["tokens"] == 16 * len(blocks)
    assert stats["anchors_matched"] > 0 and set(stats["changed_fraction"]) == {"2.5", "5", "10"}

    other_batching = build_labels(
        baseline, reinforced, sp_tokenizer, blocks, anchors, LabelConfig(context_length=16, batch_size=3), progress=False
    )
    assert torch.equal(result.labels, other_batching.labels)

    result.save(tmp_path / "labels")
    loaded = LabelSet.load(tmp_path / "labels")
    assert torch.equal(loaded.labels, result.labels) and torch.equal(loaded.input_ids, result.input_ids)
    assert loaded.alphas == result.alphas and loaded.stats == result.stats


def test_build_labels_matches_full_logits(sp_tokenizer, labelled):
    """The hidden-state path agrees with mixing the models' own logits, forbidden suppression included."""
    blocks, anchors, baseline, reinforced = labelled
    cfg = LabelConfig(context_length=16, batch_size=4, forbid_anchor_keys=True)
    result = build_labels(baseline, reinforced, sp_tokenizer, blocks[:1], anchors, cfg, progress=False)
    t = translate_block(blocks[0], anchors, sp_tokenizer, random.Random(f"{cfg.seed}:0"), forbid_anchor_keys=True)
    with torch.no_grad():
        b_logits = baseline(torch.tensor([t.translated_ids])).logits[0]
        r_logits = reinforced(torch.tensor([t.input_ids])).logits[0]
    for i, j in enumerate(t.position_map[:-1]):
        expected = [IGNORE_INDEX] * 3
        if j >= 0:
            b = b_logits[j].clone()
            b[t.forbidden[j]] = b.mean()
            expected = [int((b - alpha * torch.relu(r_logits[i] - b)).argmax()) for alpha in cfg.alphas]
        assert result.labels[0, i + 1].tolist() == expected


def test_every_mixing_impl_gives_the_same_labels(sp_tokenizer, labelled):
    """The pipeline's labels do not depend on which `generic_labels` implementation computed them."""
    blocks, anchors, baseline, reinforced = labelled
    results = {
        impl: build_labels(baseline, reinforced, sp_tokenizer, blocks[:3], anchors, LabelConfig(context_length=16, impl=impl, forbid_anchor_keys=True), progress=False).labels
        for impl in ("reference", "chunked", "triton")
    }
    assert torch.equal(results["chunked"], results["reference"])
    assert torch.equal(results["triton"], results["reference"])


def test_vocabulary_and_head_checks():
    with pytest.raises(UserError, match="differ"):
        check_same_vocabulary(tiny_llama(50, 0), tiny_llama(60, 0))
    model = tiny_llama(50, 0)
    model.lm_head = torch.nn.Linear(32, 50, bias=True)
    with pytest.raises(UserError, match="bias"):
        check_same_vocabulary(model, tiny_llama(50, 0))


def test_models_that_transform_logits_after_the_head_are_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    ids = torch.tensor([[1, 2, 3, 4]])
    llama = tiny_llama(50, 0)
    check_head_gives_logits(llama, ids, "baseline")
    torch.manual_seed(0)
    capped = Gemma2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.05)
    gemma = Gemma2ForCausalLM(capped).eval()
    with pytest.raises(UserError, match="soft-capping"):
        check_head_gives_logits(gemma, ids, "baseline")


def test_load_of_a_missing_label_set(tmp_path):
    with pytest.raises(UserError, match="no label set"):
        LabelSet.load(tmp_path)
