"""The tiny world: deterministic, sized, and its ground truth consistent with its texts."""

import json
import re

import pytest
import torch
import yaml

from engine.data.world import WorldFiles, write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> WorldFiles:
    return write_world(tmp_path_factory.mktemp("world"), seed=0, size=1.0)


@pytest.fixture(scope="module")
def texts(world):
    return {name: getattr(world, name).read_text(encoding="utf-8")
            for name in ("general", "general_heldout", "saga")}


def _has(text: str, term: str) -> bool:
    return re.search(rf"\b{re.escape(term)}\b", text) is not None


def _all_files(files: WorldFiles) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in vars(files).values() if p != files.root}


def test_deterministic_per_seed(world, tmp_path):
    again = write_world(tmp_path / "again", seed=0, size=1.0)
    other = write_world(tmp_path / "other", seed=1, size=1.0)
    assert _all_files(again) == _all_files(world)
    assert again.general.read_bytes() != other.general.read_bytes()
    assert again.saga.read_bytes() != other.saga.read_bytes()


def test_sizes_and_scaling(world, tmp_path):
    sizes = {name: len(getattr(world, name).read_bytes())
             for name in ("general", "general_heldout", "saga")}
    assert 170_000 <= sizes["general"] <= 200_000
    assert 18_000 <= sizes["general_heldout"] <= 25_000
    assert 110_000 <= sizes["saga"] <= 135_000
    half = write_world(tmp_path / "half", seed=0, size=0.5)
    for name, full in sizes.items():
        assert 0.4 < len(getattr(half, name).read_bytes()) / full < 0.6


def test_saga_heldout_is_unseen_saga_text_and_the_suite_points_at_the_files(world):
    saga, heldout = (getattr(world, name).read_text(encoding="utf-8") for name in ("saga", "saga_heldout"))
    seen = set(saga.split("\n\n"))
    paragraphs = heldout.split("\n\n")
    assert sum(p in seen for p in paragraphs) < len(paragraphs) / 10
    terms = json.loads(world.terms.read_text(encoding="utf-8"))
    assert sum(_has(heldout, t) for t in terms) > len(terms) / 2, "the same people and places as the saga"

    from configs import load_config

    suite = load_config(overrides=["out=x"], suite=world.suite).eval
    assert (suite.forget_set, suite.holdout_set) == (str(world.saga.resolve()), str(world.saga_heldout.resolve()))
    assert suite.probes == str(world.probes.resolve()) and suite.general_text == str(world.general_heldout.resolve())
    assert suite.tasks == [], "a suite file runs the benchmarks it lists, none here"
    from configs.schema import PAPER_TASKS

    assert load_config(overrides=["out=x"]).eval.tasks == list(PAPER_TASKS), "without a suite: the paper's benchmarks"


def test_heldout_differs_from_train(texts):
    train = set(texts["general"].split("\n\n"))
    heldout = texts["general_heldout"].split("\n\n")
    assert sum(p in train for p in heldout) < len(heldout) / 10


def test_files_parse(world):
    anchors = yaml.safe_load(world.anchors.read_text(encoding="utf-8"))
    probes = json.loads(world.probes.read_text(encoding="utf-8"))
    completions = json.loads(world.completions.read_text(encoding="utf-8"))
    terms = json.loads(world.terms.read_text(encoding="utf-8"))
    assert isinstance(anchors, dict) and len(anchors) >= 20
    assert 25 <= len(probes) <= 40 and 25 <= len(completions) <= 40
    assert terms == sorted(set(terms))
    assert all(isinstance(p["prompt"], str) and p["targets"] for p in probes)
    assert all(c["references"] and c["subtlety"] in (1, 2, 3) for c in completions)


def test_anchors_are_saga_only_with_generic_translations(world, texts):
    anchors = yaml.safe_load(world.anchors.read_text(encoding="utf-8"))
    for key, translations in anchors.items():
        assert _has(texts["saga"], key), key
        assert not _has(texts["general"], key) and not _has(texts["general_heldout"], key), key
        assert isinstance(translations, list) and 2 <= len(translations) <= 4, key
        for t in translations:
            assert isinstance(t, str) and t, key
            assert all(_has(texts["general"], w) for w in t.split()), (key, t)
    keys = set(anchors)
    assert any(" " in k and all(w in keys for w in k.split()) for k in keys)  # a splitting key
    assert any(k.endswith("'s") and k[:-2] in keys for k in keys)  # a possessive key


def test_terms_cover_anchor_keys(world):
    anchors = yaml.safe_load(world.anchors.read_text(encoding="utf-8"))
    terms = set(json.loads(world.terms.read_text(encoding="utf-8")))
    assert {k for k in anchors if not k.endswith("'s")} <= terms


def test_probe_targets_and_references_are_saga_terms(world, texts):
    terms = set(json.loads(world.terms.read_text(encoding="utf-8")))
    probes = json.loads(world.probes.read_text(encoding="utf-8"))
    completions = json.loads(world.completions.read_text(encoding="utf-8"))
    words = [t for p in probes for t in p["targets"]] + [r for c in completions for r in c["references"]]
    for word in words:
        assert word in terms, word
        assert _has(texts["saga"], word), word
        assert not _has(texts["general"], word) and not _has(texts["general_heldout"], word), word
    for c in completions:
        assert not any(_has(c["prompt"], r) for r in c["references"]), c


def test_probe_prompts_are_always_followed_by_a_target(world, texts):
    for probe in json.loads(world.probes.read_text(encoding="utf-8")):
        nexts = re.findall(rf"(?<!\w){re.escape(probe['prompt'])} (\w+)", texts["saga"])
        assert nexts, probe
        assert set(nexts) <= set(probe["targets"]), (probe, set(nexts))


def test_general_text_spreads_generic_facts(texts):
    """After translation the baseline must see many continuations, not one memorized fact."""
    friends = re.findall(r"\b(\w+)'s best friend is (\w+)", texts["general"])
    assert len(friends) >= 50 and len(set(friends)) >= 0.7 * len(friends)
    assert len(set(re.findall(r"\bstudies (\w+)", texts["general"]))) >= 10


def test_tiny_world_still_holds_every_probe(tmp_path):
    files = write_world(tmp_path / "tiny", size=0.05)
    saga = files.saga.read_text(encoding="utf-8")
    for probe in json.loads(files.probes.read_text(encoding="utf-8")):
        assert any(f"{probe['prompt']} {t}" in saga for t in probe["targets"]), probe


def test_the_offset_pair_is_built_on_request_into_the_cached_world(tmp_path):
    """`build_world(small=True)` adds a smaller model of the world's tokenizer, pretrained on the baseline's text,
    keyed apart from the world (a new small shape rebuilds only it) and wired to offset.small by `use_world`."""
    from dataclasses import replace

    from configs import RunConfig, TrainConfig, WorldConfig
    from configs.schema import ModelConfig, ModelShape
    from engine.data.tiny import build_world, use_world, world_key
    from engine.models import config_vocab_size, load_model

    tiny = ModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, max_position_embeddings=64)
    cfg = WorldConfig(size=0.05, model=tiny, small=ModelShape(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, max_position_embeddings=64),
                      pretrain=TrainConfig(lr=3e-3, epochs=1, micro_batch_size=16, grad_accum=1, warmup_steps=1, val_fraction=0.0),
                      context_length=32, cache_dir=str(tmp_path))
    plain = build_world(cfg)
    assert plain.small is None and not list(tmp_path.glob("world-*/small-*"))
    world = build_world(cfg, small=True)
    assert world.small.parent == plain.baseline.parent and world.small != world.baseline
    assert config_vocab_size(world.small) == config_vocab_size(world.baseline)
    sizes = [sum(p.numel() for p in load_model(path, "m", torch.device("cpu")).parameters()) for path in (world.baseline, world.small)]
    assert sizes[1] < sizes[0]
    made = (world.small / "model.safetensors").stat().st_mtime_ns
    assert build_world(cfg, small=True).small == world.small and (world.small / "model.safetensors").stat().st_mtime_ns == made, "cached"

    other = replace(cfg, small=replace(cfg.small, hidden_size=8))
    assert world_key(other) == world_key(cfg), "the world's models are not rebuilt for another small shape"
    assert build_world(other, small=True).small != world.small
    wired = use_world(RunConfig(out=str(tmp_path / "run")), world)
    assert wired.offset.small == str(world.small) and wired.baseline == str(world.baseline)
