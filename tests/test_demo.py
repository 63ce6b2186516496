"""`obliviate demo` end to end with its default config: the method must actually unlearn.

This is the issue's acceptance bar, checked on every run of the suite (≈ 2–3 minutes on 2 cores), through
the distributed engine (2 Ray workers with DeepSpeed ZeRO-3 and a labeler, as `make demo` runs it):
probability familiarity drops ≥ 90% from the baseline, completion familiarity drops, and general
perplexity rises ≤ 10%.
"""

import json

import pytest

from launcher.cli import main


@pytest.mark.slow
def test_demo_unlearns_the_saga_and_keeps_general_text(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", f"world.cache_dir={tmp_path / 'cache'}", "--out", str(out)])
    printed = capsys.readouterr().out
    for column in ("baseline", "unlearned", "oracle"):
        assert column in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["schema_version"] == 2
    models = metrics["models"]
    baseline, unlearned, oracle = models["baseline"], models["unlearned"], models["oracle"]
    assert baseline["probability_familiarity"] > 0.3, "the baseline must know the saga for the demo to mean anything"
    assert oracle["probability_familiarity"] < 0.01
    assert unlearned["probability_familiarity"] <= 0.1 * baseline["probability_familiarity"]
    assert unlearned["completion_familiarity"] < baseline["completion_familiarity"]
    assert unlearned["perplexity"] <= 1.10 * baseline["perplexity"]
    for name in ("baseline", "unlearned", "oracle"):  # the suite: memorization and membership for all three
        for key in ("memorization_accuracy", "extraction_likelihood", "verbatim_rouge", "memorized_outliers", "mia_auc_min_k"):
            assert models[name][key] is not None, (name, key)
    for attack in ("quant8", "quant4"):  # the demo's attacks re-evaluate each unlearned model quantized
        assert models[f"unlearned ({attack})"]["probability_familiarity"] is not None
        assert metrics["extra"]["attack_recovery"][f"unlearned ({attack})"]["probability_familiarity"] is not None
    for name in ("baseline", "unlearned"):  # closeness to the oracle for the others
        assert models[name]["privleak"] is not None and models[name]["forget_quality"] is not None

    for name in ("config.yaml", "run.log", "report.md", "report.png", "unlearned/model.safetensors", "reinforced/model.safetensors"):
        assert (out / name).exists(), name
    assert not (out / "labels").exists() and not (out / "checkpoints" / "unlearn").exists(), "labels streamed, checkpoints cleaned up"
    training = metrics["extra"]["training"]["unlearned"]
    assert training["workers"] == 2, "the demo trains on the distributed engine"
    assert training["throughput"]["tokens_per_s"] > 0
    assert list((out / "tb").rglob("events.out.tfevents.*")), "tensorboard events"

    # A finished run is refused before anything is rebuilt or rewritten.
    with pytest.raises(SystemExit) as refused:
        main(["demo", f"world.cache_dir={tmp_path / 'cache'}", "--out", str(out)])
    assert refused.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
