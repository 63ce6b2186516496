"""Offset unlearning's inference: the offset artifact (o′ + offset.json naming M, o, α) as a causal LM.

- a fresh artifact (o′ = o) is M: the same logits and greedy continuations;
- once o′ changed, `generate` (with and without the key/value cache) and the evaluation's `_greedy` equal a
  hand-written loop of full forwards over the three models, z = z_M + α·(z_o′ − z_o);
- lm-eval's HFLM runs a local task through it; quantization rounds all three models, relearning trains o′ alone;
- `obliviate eval --model ARTIFACT` and a tiny offset-ga `obliviate run` through eval write their reports;
- on 2 ZeRO-3 Ray ranks (M, o and o′ each partitioned) the evaluation measures what one process does;
- bad input: offset.json naming a missing M or o, α ≤ 0, not a record; an artifact as a training baseline: one line, exit 2.
"""

import json

import pytest
import torch
from optimum.quanto import QBytesTensor
from transformers import AutoModelForCausalLM

from builders import assert_one_line_error, mean_nll, obliviate, tiny_llama
from configs import EngineConfig
from engine.data.tiny import tiny_llama as world_llama
from engine.evaluation.attacks import quantized, relearned
from engine.evaluation.benchmarks import load_tasks, run_benchmarks
from engine.evaluation.memorization import _greedy
from engine.evaluation.ranks import EvalJob, measure_models
from engine.evaluation.suite import combine, evaluate_model, load_suite, workload
from engine.models import load_model, load_tokenizer, save_model
from engine.offset_model import OffsetModel, OffsetRecord
from engine.training.runners.ray_runner import RayRunner
from test_benchmarks import write_task
from test_cli import derive_world, world  # noqa: F401 - the module-scoped tiny world
from test_engine import COMMON, REFERENCE
from test_evaluate_cluster import SHARD_ALL, assert_same, suite_files  # noqa: F401 - its model and suite
from test_ray import cluster  # noqa: F401 - the module-scoped loopback Ray cluster

ALPHA = 2.0
CPU = torch.device("cpu")
SMALL_EVAL = ["eval.sequence_length=32", "eval.prefix_length=16", "eval.el_n=4", "eval.max_sequences=4", "eval.max_new_tokens=4", "eval.context_length=64", "eval.perturbations=0", "eval.tasks=[]"]


def make_artifact(baseline, small, out, alpha=ALPHA, perturbation=0.0):
    """An offset artifact at `out`: o′ = o's weights (plus seeded noise of std `perturbation`), o's tokenizer."""
    trained = load_model(small, "small", CPU)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in trained.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * perturbation)
    save_model(trained, load_tokenizer(small, "small"), out)
    OffsetRecord(baseline, small, alpha).write(out)
    return out


@pytest.fixture(scope="module")
def models(world, tmp_path_factory):  # noqa: F811
    """M (the world's baseline), o (narrower, its tokenizer), a fresh artifact and one whose o′ moved."""
    root, tokenizer = tmp_path_factory.mktemp("offset-model"), load_tokenizer(world["baseline"], "baseline")
    narrow = derive_world(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
    save_model(world_llama(narrow, len(tokenizer)), tokenizer, root / "small")
    return {
        "baseline": world["baseline"], "small": root / "small", "tokenizer": tokenizer,
        "fresh": make_artifact(world["baseline"], root / "small", root / "fresh"),
        "moved": make_artifact(world["baseline"], root / "small", root / "moved", perturbation=0.2),
    }


def by_hand(parts, prefix: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding of the ensemble by its definition: a full forward of each model per token."""
    baseline, small, trained = parts
    ids = torch.tensor([prefix])
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = baseline(ids).logits + ALPHA * (trained(ids).logits - small(ids).logits)
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
    return ids[0, len(prefix) :].tolist()


def test_a_fresh_artifact_is_the_baseline(models):
    ensemble, baseline = load_model(models["fresh"], "evaluated", CPU).eval(), load_model(models["baseline"], "baseline", CPU).eval()
    assert isinstance(ensemble, OffsetModel) and ensemble.alpha == ALPHA
    ids = torch.tensor([models["tokenizer"]("Harry went to the castle and the wizard")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ensemble(ids).logits, baseline(ids).logits, rtol=0, atol=1e-5)
    prompt = torch.randint(3, 400, (3, 6), generator=torch.Generator().manual_seed(1))
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ensemble.generate(prompt, **greedy), baseline.generate(prompt, **greedy))


def test_greedy_decoding_of_a_moved_artifact_is_the_ensemble_by_hand(models):
    ensemble = load_model(models["moved"], "evaluated", CPU).eval()
    parts = [AutoModelForCausalLM.from_pretrained(path).eval() for path in (models["baseline"], models["small"], models["moved"])]  # the last: o′ alone
    prompts = [[5, 17, 42, 9, 77, 3], [120, 8, 61, 33, 2, 19]]
    want = [by_hand(parts, prompt, 10) for prompt in prompts]
    assert want != [by_hand(parts[:2] + [parts[1]], prompt, 10) for prompt in prompts], "o′ moved far enough to change the decoding"
    for use_cache in (True, False):
        got = ensemble.generate(torch.tensor(prompts), max_new_tokens=10, do_sample=False, pad_token_id=0, use_cache=use_cache)
        assert got[:, 6:].tolist() == want, f"use_cache={use_cache}"
    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(ensemble.generate(torch.tensor(prompts), **beams), ensemble.generate(torch.tensor(prompts), use_cache=False, **beams)), "beam reordering reaches all three caches"
    ragged = [prompts[0], prompts[1][2:], prompts[0][:3]]  # left-padded rows, one cache per model
    assert _greedy(ensemble, ragged, [16, 12, 9], 3, "test") == [by_hand(parts, prefix, total - len(prefix)) for prefix, total in zip(ragged, [16, 12, 9])]


def test_lm_eval_runs_a_local_task_through_the_offset_model(models, tmp_path):
    """Both choices are the same text, so lm-eval picks the first: the accuracy is the share of answer-0 documents."""
    docs = [{"question": f"where did Harry go {i}", "choices": ["to Hogwarts", "to Hogwarts"], "answer": int(i == 2)} for i in range(3)]
    tasks = load_tasks(["offset_mc"], [write_task(tmp_path / "tasks", "offset_mc", docs)])
    scores = run_benchmarks(load_model(models["moved"], "evaluated", CPU), models["tokenizer"], tasks, batch_size=2)
    assert scores["offset_mc"]["acc"] == pytest.approx(2 / 3)


def test_quantization_rounds_all_three_models_and_relearning_trains_only_o_prime(models):
    ensemble = load_model(models["moved"], "evaluated", CPU).eval()
    attacked = quantized(ensemble, "quant8")
    for part in attacked.parts:
        assert isinstance(part.model.layers[0].mlp.gate_proj.weight, QBytesTensor) and isinstance(part.lm_head.weight, QBytesTensor)
    assert attacked.generate(torch.tensor([[5, 17, 42]]), max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 7)

    blocks = torch.randint(3, 400, (2, 16), generator=torch.Generator().manual_seed(2))
    before = {name: p.detach().clone() for name, p in ensemble.named_parameters()}
    start = mean_nll(ensemble, blocks)
    for steps, copy in relearned(ensemble, blocks, [2], lr=1e-2):
        assert steps == 2 and mean_nll(copy, blocks) < start
        assert copy.baseline.model.embed_tokens.weight is ensemble.baseline.model.embed_tokens.weight, "M is shared, not copied"
        changed = {name for name, p in copy.named_parameters() if not torch.equal(p, before[name])}
        assert changed and all(name.startswith("trained.") for name in changed), "only o′ trains"
    for name, p in ensemble.named_parameters():
        assert torch.equal(p, before[name]), name


def test_eval_of_an_offset_artifact_end_to_end(world, models, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    code, out, err = obliviate(
        "eval", "--model", models["moved"], "--baseline", world["baseline"], "--anchors", world["files"].anchors, "--suite", world["files"].suite,
        "--out", run, "--workers", "0", *SMALL_EVAL, "eval.attacks=[quant8,relearn]", "eval.relearn_steps=[1]", "eval.relearn_blocks=2", capsys=capsys,
    )
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())["models"]
    assert list(metrics) == ["baseline", "unlearned", "unlearned (quant8)", "unlearned (relearn 1)"]
    assert metrics["unlearned"]["probability_familiarity"] != metrics["baseline"]["probability_familiarity"]
    assert "unlearned (quant8): recovery toward the baseline" in (run / "report.md").read_text()


def test_offset_ga_run_evaluates_its_artifact(world, models, tmp_path, capsys):  # noqa: F811
    run, files = tmp_path / "run", world["files"]
    suite = [f"eval.probes={files.probes}", f"eval.completions={files.completions}", f"eval.general_text={files.general_heldout}", f"eval.forget_set={files.saga}", f"eval.holdout_set={files.saga_heldout}"]
    code, _, err = obliviate(
        "run", "--baseline", world["baseline"], "--target", files.saga, "--anchors", files.anchors, "--out", run, "method=offset-ga", f"offset.small={models['small']}",
        *COMMON, *REFERENCE, "unlearn.max_steps=1", *suite, *SMALL_EVAL, capsys=capsys,
    )
    assert code == 0, err
    assert (run / "unlearned" / "offset.json").is_file() and "skipping eval" not in (run / "run.log").read_text()
    assert list(json.loads((run / "metrics.json").read_text())["models"]) == ["baseline", "unlearned"]
    assert "unlearned: offset unlearning, gradient ascent on the ensemble, 1 steps" in (run / "report.md").read_text()
    assert f"o′ trained from {models['small']}, α 1 (the ensemble runs three models per token)" in (run / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_zero3_ranks_measure_an_offset_artifact_as_one_process(cluster, suite_files, tmp_path):  # noqa: F811
    root, tokenizer, cfg = suite_files
    save_model(tiny_llama(len(tokenizer), 1, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256), tokenizer, tmp_path / "small")
    artifact = make_artifact(root / "model", tmp_path / "small", tmp_path / "artifact", perturbation=0.2)
    suite = load_suite(cfg)
    in_process = evaluate_model(load_model(artifact, "evaluated", CPU), tokenizer, cfg, ["Hogwarts", "Hermione"], suite)
    work = workload(tokenizer, cfg, suite)
    with RayRunner(EngineConfig(workers=2, cpus_per_worker=1), "cpu") as runner:
        ranks = runner.on_ranks(measure_models, [EvalJob("unlearned", artifact, work)], cfg, "cpu", "float32", SHARD_ALL, what="evaluation")
    assert_same(combine(work, [rank[0] for rank in ranks], tokenizer, cfg, suite, ["Hogwarts", "Hermione"]), in_process)


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"baseline": "{missing}"}, "names a baseline (M) that does not exist"),
        ({"small": "{missing}"}, "names a small model (o) that does not exist"),
        ({"alpha": 0}, "the offset scale must be a finite number > 0"),
        ({"alpha": -1.5}, "the offset scale must be a finite number > 0"),
        ({"alpha": None}, "is not a record of baseline, small and alpha"),
    ],
)
def test_a_bad_offset_record_is_one_line(models, tmp_path, capsys, record, fragment):
    artifact = make_artifact(models["baseline"], models["small"], tmp_path / "artifact")
    fields = {**json.loads((artifact / "offset.json").read_text()), **record}
    fields = {key: value.format(missing=tmp_path / "nope") if isinstance(value, str) else value for key, value in fields.items()}
    (artifact / "offset.json").write_text(json.dumps(fields))
    code, _, err = obliviate("eval", "--model", artifact, "--out", tmp_path / "run", "--workers", "0", "eval.tasks=[]", capsys=capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_training_refuses_an_offset_artifact_as_its_baseline(world, models, tmp_path, capsys):  # noqa: F811
    code, _, err = obliviate("unlearn", "--baseline", models["moved"], "--target", world["files"].saga, "--out", tmp_path / "run", "method=ga", *REFERENCE, capsys=capsys)
    assert_one_line_error(code, err, "is an offset artifact: training takes a Hugging Face model directory")
    assert not (tmp_path / "run").exists()
