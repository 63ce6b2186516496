"""Evaluation metrics on models whose next-token distribution is set by hand, so answers are known."""

import dataclasses
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from builders import sentencepiece_tokenizer
from configs.schema import EvalConfig
from configs.errors import UserError
from engine.evaluation.suite import (
    compare_to_oracle,
    completion_familiarity,
    evaluate_model,
    load_completion_prompts,
    load_probes,
    perplexity,
    probability_familiarity,
)

CORPUS = (
    "Harry went to Hogwarts with Ron and Hermione. The wizard studies magic at the castle. "
    "Once upon a time a farmer walked to the market and sold bread to the baker. "
)
HIDDEN = 128  # >= vocabulary, so every token gets its own one-hot embedding
PEAK = 40.0  # a logit this far above the rest carries all but e^-40 of the mass


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return sentencepiece_tokenizer(CORPUS * 20, 96, tmp_path_factory.mktemp("tokenizer"))


def llama_config(tokenizer, **overrides) -> LlamaConfig:
    shape = dict(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **{**shape, **overrides},
    )


def bigram_llama(tokenizer, table: torch.Tensor) -> LlamaForCausalLM:
    """A real Llama whose logits after token t are exactly `table[t]`, whatever came before.

    The layer's attention and MLP outputs are zeroed, so the residual stream is the embedding; embeddings
    are one-hot, the final RMSNorm scales a one-hot by sqrt(hidden), and the head divides that back out.
    """
    vocab = table.shape[0]
    model = LlamaForCausalLM(llama_config(tokenizer, rms_norm_eps=1e-12))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab].copy_(torch.eye(vocab))
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :vocab].copy_(table.T / math.sqrt(HIDDEN))
    return model


def peak_chain(table: torch.Tensor, tokens: list[int]) -> None:
    """Make each token of the chain follow the previous one with certainty."""
    for prev, nxt in zip(tokens, tokens[1:]):
        assert table[prev].max() < PEAK, "test setup: a token would need two certain successors"
        table[prev, nxt] = PEAK


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def word_ids(tokenizer, word: str) -> list[int]:
    return tokenizer(" " + word, add_special_tokens=False)["input_ids"]


def test_certain_target_has_mass_one_and_absent_target_mass_zero(tokenizer):
    table = torch.zeros(len(tokenizer), len(tokenizer))
    peak_chain(table, [ids(tokenizer, "The wizard studies")[-1], *word_ids(tokenizer, "magic")])
    peak_chain(table, [ids(tokenizer, "The farmer sold")[-1], *word_ids(tokenizer, "bread")])
    probes = [
        {"prompt": "The wizard studies", "targets": ["magic"]},
        {"prompt": "The farmer sold", "targets": ["Hogwarts"]},
    ]
    result = probability_familiarity(bigram_llama(tokenizer, table), tokenizer, probes)
    certain, absent = result["per_probe"]
    assert certain["mass"] == pytest.approx(1.0, abs=1e-6)
    assert absent["mass"] == pytest.approx(0.0, abs=1e-6)
    assert result["score"] == pytest.approx(0.5, abs=1e-6)
    top_token, top_prob = certain["top"][0]
    assert top_token == tokenizer.decode(word_ids(tokenizer, "magic")[:1])
    assert top_prob == pytest.approx(1.0, abs=1e-6) and len(certain["top"]) == 5


def test_multi_token_targets_follow_the_chain_rule_and_sum_once_each(tokenizer):
    torch.manual_seed(0)
    table = 2.0 * torch.randn(len(tokenizer), len(tokenizer))
    prompt = "Harry went to"
    hermione, castle = word_ids(tokenizer, "Hermione"), word_ids(tokenizer, "castle")
    assert len(hermione) >= 2, "test setup: the chain rule needs a multi-token word"

    def by_hand(continuation: list[int]) -> float:
        chain = [ids(tokenizer, prompt)[-1], *continuation]
        return math.prod(table[prev].softmax(-1)[nxt].item() for prev, nxt in zip(chain, chain[1:]))

    probes = [{"prompt": prompt, "targets": ["Hermione", "castle", "Hermione"]}]
    result = probability_familiarity(bigram_llama(tokenizer, table), tokenizer, probes)
    entry = result["per_probe"][0]
    assert entry["targets"]["Hermione"] == pytest.approx(by_hand(hermione), rel=1e-4)
    assert entry["mass"] == pytest.approx(by_hand(hermione) + by_hand(castle), rel=1e-4)


def test_uniform_model_has_perplexity_equal_to_vocabulary_size(tokenizer):
    table = torch.zeros(len(tokenizer), len(tokenizer))
    ppl = perplexity(bigram_llama(tokenizer, table), tokenizer, CORPUS * 3, context_length=16)
    assert ppl == pytest.approx(len(tokenizer), abs=1e-4)


def test_perplexity_scores_every_token_but_window_starts(tokenizer):
    torch.manual_seed(1)
    table = 2.0 * torch.randn(len(tokenizer), len(tokenizer))
    text, context = CORPUS * 2, 7
    tokens = ids(tokenizer, text)
    assert len(tokens) % context not in (0, 1), "test setup: the last window should be partial"
    log_probs = table.log_softmax(-1)
    nll = [-log_probs[tokens[i - 1], tokens[i]].item() for i in range(1, len(tokens)) if i % context != 0]
    ppl = perplexity(bigram_llama(tokenizer, table), tokenizer, text, context_length=context, batch_size=3)
    assert ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_perplexity_needs_two_tokens(tokenizer):
    table = torch.zeros(len(tokenizer), len(tokenizer))
    with pytest.raises(UserError, match="too short"):
        perplexity(bigram_llama(tokenizer, table), tokenizer, "")


def test_completion_familiarity_grades_greedy_completions(tokenizer):
    table = torch.zeros(len(tokenizer), len(tokenizer))
    prompt_end = ids(tokenizer, "Harry went to")[-1]
    peak_chain(table, [prompt_end, *word_ids(tokenizer, "Hogwarts"), tokenizer.eos_token_id])
    prompts = [
        {"prompt": "Harry went to", "references": []},  # the saga term comes from saga_terms
        {"prompt": "Hogwarts is where Ron went to", "references": ["Hogwarts"]},  # already in the prompt
    ]
    result = completion_familiarity(bigram_llama(tokenizer, table), tokenizer, prompts, ["Hogwarts"], EvalConfig(batch_size=2))
    assert [s["completion"].strip() for s in result["samples"]] == ["Hogwarts", "Hogwarts"]
    assert [s["grade"] for s in result["samples"]] == [2, 0]  # a target term, not one of the prompt's references
    assert result["samples"][0]["revealed"] == ["Hogwarts"]
    assert result["counts"] == {"0": 1, "1": 0, "2": 1, "3": 0} and result["judge"] == "rule"
    assert result["score"] == pytest.approx(1 / 2)


def test_batching_and_padding_do_not_change_results(tokenizer):
    torch.manual_seed(2)
    model = LlamaForCausalLM(llama_config(tokenizer, num_hidden_layers=2))
    probes = [
        {"prompt": "Harry", "targets": ["went", "Hermione"]},
        {"prompt": "Once upon a time a farmer walked to the", "targets": ["market"]},
        {"prompt": "The wizard", "targets": ["studies"]},
    ]
    prompts = [{"prompt": p["prompt"], "references": []} for p in probes]
    one = probability_familiarity(model, tokenizer, probes, batch_size=1)
    many = probability_familiarity(model, tokenizer, probes, batch_size=3)
    assert [p["mass"] for p in many["per_probe"]] == pytest.approx([p["mass"] for p in one["per_probe"]], rel=1e-4)
    gen_one = completion_familiarity(model, tokenizer, prompts, [], EvalConfig(max_new_tokens=6, batch_size=1))
    gen_many = completion_familiarity(model, tokenizer, prompts, [], EvalConfig(max_new_tokens=6, batch_size=3))
    assert [s["completion"] for s in gen_many["samples"]] == [s["completion"] for s in gen_one["samples"]]
    assert model.training, "evaluation must give the model back in the mode it found it"


def test_sampled_completions_are_seeded(tokenizer):
    torch.manual_seed(3)
    model = LlamaForCausalLM(llama_config(tokenizer, num_hidden_layers=1))
    prompts = [{"prompt": "Harry went", "references": []}, {"prompt": "The wizard", "references": []}]

    def completions(seed):
        cfg = EvalConfig(max_new_tokens=8, batch_size=2, sample=True, temperature=1.5, seed=seed)
        return [s["completion"] for s in completion_familiarity(model, tokenizer, prompts, [], cfg)["samples"]]

    assert completions(0) == completions(0)
    assert completions(0) != completions(1)


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not readable JSON"),
        ("[]", "non-empty JSON list"),
        ('{"prompt": "a"}', "non-empty JSON list"),
        ('[{"prompt": "a", "targets": ["b"]}, 3]', "item 1: expected an object"),
        ('[{"prompt": "a", "targets": ["b"]}, {"targets": ["b"]}]', "item 1: missing field 'prompt'"),
        ('[{"prompt": "a"}]', "item 0: missing field 'targets'"),
        ('[{"prompt": "a", "targets": []}]', "item 0: 'targets' must not be empty"),
        ('[{"prompt": "a", "targets": "magic"}]', "item 0: 'targets' must be a list"),
        ('[{"prompt": "", "targets": ["b"]}]', "item 0: 'prompt' must be a non-empty string"),
    ],
)
def test_probe_loader_errors_name_file_index_and_field(tmp_path, content, message):
    path = tmp_path / "probes.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as error:
        load_probes(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_completion_loader(tmp_path):
    good = [{"prompt": "a", "references": [], "subtlety": 2}, {"prompt": "b", "references": ["Ron"]}]
    assert load_completion_prompts(write_json(tmp_path / "ok.json", good)) == good
    (tmp_path / "ok.jsonl").write_text("".join(json.dumps(item) + "\n" for item in good))
    assert load_completion_prompts(tmp_path / "ok.jsonl") == good
    with pytest.raises(UserError, match="item 0: missing field 'references'"):
        load_completion_prompts(write_json(tmp_path / "bad.json", [{"prompt": "a", "targets": ["b"]}]))
    with pytest.raises(UserError, match="not found"):
        load_completion_prompts(tmp_path / "missing.json")


def test_evaluate_model_runs_each_metric_and_skips_empty_files(tokenizer, tmp_path):
    table = torch.zeros(len(tokenizer), len(tokenizer))
    model = bigram_llama(tokenizer, table)
    (tmp_path / "general.txt").write_text(CORPUS)
    cfg = EvalConfig(
        tasks=[],
        probes=write_json(tmp_path / "probes.json", [{"prompt": "Harry went", "targets": ["to"]}]),
        completions="",
        general_text=str(tmp_path / "general.txt"),
        max_new_tokens=4,
    )
    result = evaluate_model(model, tokenizer, cfg, saga_terms=["Hogwarts"])
    assert result["perplexity"] == pytest.approx(len(tokenizer), abs=1e-4)
    assert 0.0 < result["probability_familiarity"] < 1.0
    assert result["completion_familiarity"] is None
    assert result["details"]["completion_familiarity"] == "skipped"
    with pytest.raises(UserError, match="not found"):
        evaluate_model(model, tokenizer, dataclasses.replace(cfg, completions=str(tmp_path / "missing.json")), saga_terms=[])


def test_memorization_membership_and_oracle_closeness_join_the_results(tokenizer, tmp_path):
    """Two copies of one model: each other's oracle, so PrivLeak is 0 and the KS p-value 1."""
    torch.manual_seed(4)
    model = LlamaForCausalLM(llama_config(tokenizer, num_hidden_layers=1))
    (tmp_path / "forget.txt").write_text(CORPUS * 3)
    (tmp_path / "holdout.txt").write_text(CORPUS[::-1] * 3)
    cfg = EvalConfig(tasks=[], forget_set=str(tmp_path / "forget.txt"), holdout_set=str(tmp_path / "holdout.txt"), sequence_length=16, prefix_length=8, el_n=2, el_stride=4, batch_size=4)
    results = {name: evaluate_model(model, tokenizer, cfg, saga_terms=[]) for name in ("unlearned", "oracle")}
    compare_to_oracle(results)
    unlearned = results["unlearned"]
    for key in ("memorization_accuracy", "extraction_likelihood", "verbatim_rouge", "mia_auc_loss", "mia_auc_zlib", "mia_auc_min_k", "mia_auc_perturbation"):
        assert 0.0 <= unlearned[key] <= 1.0, key
    assert isinstance(unlearned["memorized_outliers"], int)
    memorized = unlearned["details"]["memorization"]
    accuracies = memorized["memorization_accuracy"]["per_sequence"]
    assert memorized["band_outliers"]["count"] == unlearned["memorization_band_outliers"] == sum(g <= 0.15 or g >= 0.6 for g in accuracies)
    assert len(unlearned["details"]["membership"]["forget"]["perturbation"]) == len(accuracies)
    assert "mia_auc_perturbation" not in evaluate_model(model, tokenizer, dataclasses.replace(cfg, perturbations=0), saga_terms=[])
    alone = evaluate_model(model, tokenizer, dataclasses.replace(cfg, holdout_set="", outlier_band=[0.0, 1.0]), saga_terms=[])
    assert alone["memorized_outliers"] is None and alone["memorization_band_outliers"] == sum(g in (0.0, 1.0) for g in accuracies)
    assert unlearned["privleak"] == pytest.approx(0.0) and unlearned["forget_quality"] == pytest.approx(1.0)
    assert "privleak" not in results["oracle"]
