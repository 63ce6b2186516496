"""The evaluation on 2 Ray ranks, each holding the model ZeRO-3-partitioned (real DeepSpeed over gloo), equals
the in-process evaluation on every metric, lm-eval included; shares are uneven and one rank has nothing of a
part. Plus the pieces the equality rests on: shares of whole batches, and per-item seeds.
"""

import json
import math

import pytest

from builders import assert_one_line_error, obliviate, sentencepiece_tokenizer, tiny_llama
from configs import EngineConfig
from configs.schema import EvalConfig
from engine.evaluation.inference import share
from engine.evaluation.ranks import EvalJob, measure_models
from engine.evaluation.suite import combine, complete, evaluate_model, load_suite, workload
from engine.models import save_model
from engine.training.runners.ray_runner import RayRunner
from test_benchmarks import write_task
from test_ray import cluster  # noqa: F401 - the module-scoped loopback Ray cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SAGA = "Harry went to Hogwarts with Ron and Hermione. The wizard studies magic at the castle. "
GENERAL = "Once upon a time a farmer walked to the market and sold bread to the baker. "
SHARD_ALL = {"stage3_param_persistence_threshold": 0}  # tiny parameters would otherwise stay whole on every rank


@pytest.fixture(scope="module")
def suite_files(tmp_path_factory):
    """A model directory and a suite whose parts split unevenly over 2 ranks at batch size 2: 5 probe targets
    (3 batches), 3 sampled prompts, 5 forget and 5 holdout sequences, and a single perplexity window (rank 1
    gets none of it)."""
    root = tmp_path_factory.mktemp("cluster-eval")
    tokenizer = sentencepiece_tokenizer((SAGA + GENERAL) * 20, 96, root / "tokenizer")
    save_model(tiny_llama(len(tokenizer), 0, max_position_embeddings=256), tokenizer, root / "model")
    probes = [{"prompt": "Harry went to", "targets": ["Hogwarts", "the"]}, {"prompt": "The wizard", "targets": ["studies", "walked"]}, {"prompt": "sold", "targets": ["bread"]}]
    prompts = [{"prompt": p, "references": ["Hogwarts"]} for p in ("Harry went", "The wizard", "Once upon")]
    (root / "probes.json").write_text(json.dumps(probes))
    (root / "prompts.json").write_text(json.dumps(prompts))
    (root / "general.txt").write_text(GENERAL)
    (root / "forget.txt").write_text(SAGA * 12)
    (root / "holdout.txt").write_text(GENERAL * 12)
    docs = [{"question": f"where did Harry go {i}", "choices": ["to Hogwarts", "to the market"], "answer": i % 2} for i in range(3)]
    tasks = write_task(root / "tasks", "tiny_mc", docs)
    cfg = EvalConfig(
        probes=str(root / "probes.json"), completions=str(root / "prompts.json"), general_text=str(root / "general.txt"),
        forget_set=str(root / "forget.txt"), holdout_set=str(root / "holdout.txt"), tasks=["tiny_mc"], task_dirs=[str(tasks)],
        sample=True, temperature=1.5, max_new_tokens=5, sequence_length=16, max_sequences=5, prefix_length=8, el_n=2, el_stride=4,
        perturbations=2, context_length=64, batch_size=2,
    )
    return root, tokenizer, cfg


def assert_same(found, expected, where="results"):
    """Equal structure; floats to 1e-5 relative, everything else (counts, texts, grades) exactly."""
    if isinstance(expected, dict):
        assert list(found) == list(expected), where
        for key in expected:
            assert_same(found[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(found) == len(expected), where
        for index, (mine, theirs) in enumerate(zip(found, expected)):
            assert_same(mine, theirs, f"{where}[{index}]")
    elif isinstance(expected, float) and not isinstance(found, bool):
        assert found == pytest.approx(expected, rel=1e-5, abs=1e-12, nan_ok=True), where
    else:
        assert found == expected, where


def test_two_zero3_ranks_measure_every_metric_as_one_process(cluster, suite_files):  # noqa: F811
    root, tokenizer, cfg = suite_files
    suite = load_suite(cfg)
    model = tiny_llama(len(tokenizer), 0, max_position_embeddings=256)
    in_process = evaluate_model(model, tokenizer, cfg, ["Hogwarts", "Hermione"], suite)
    work = workload(tokenizer, cfg, suite)
    assert len(work.pairs) == 5 and len(work.windows) == 1 and len(work.forget) == len(work.holdout) == 5
    with RayRunner(EngineConfig(workers=2, cpus_per_worker=1), "cpu") as runner:
        ranks = runner.on_ranks(measure_models, [EvalJob("model", root / "model", work)], cfg, "cpu", "float32", SHARD_ALL, what="evaluation")
    assert [len(rank[0]["pairs"]) for rank in ranks] == [4, 1] and [len(rank[0]["windows"]) for rank in ranks] == [1, 0]
    assert ranks[1][0]["benchmarks"] is None, "lm-eval runs on every rank; rank 0's scores are kept"
    on_cluster = combine(work, [rank[0] for rank in ranks], tokenizer, cfg, suite, ["Hogwarts", "Hermione"])
    assert_same(on_cluster, in_process)
    assert in_process["benchmark:tiny_mc"] is not None and "mia_auc_perturbation" in in_process
    assert {sample["completion"] for sample in in_process["details"]["completion_familiarity"]["samples"]} != {""}


@pytest.mark.parametrize("count, batch, world", [(5, 2, 2), (7, 3, 2), (1, 4, 3), (0, 2, 2), (12, 1, 5)])
def test_shares_are_contiguous_runs_of_whole_batches_covering_every_item_once(count, batch, world):
    shares = [share(count, batch, rank, world) for rank in range(world)]
    assert [i for s in shares for i in range(count)[s]] == list(range(count))
    assert all(s.start % batch == 0 for s in shares if s.start < count), "a share starts at a batch boundary"
    runs = [math.ceil((s.stop - s.start) / batch) for s in shares]
    assert max(runs) - min(runs) <= 1, "balanced in batches"


def test_a_sampled_completion_depends_on_its_index_not_on_who_samples_it(suite_files):
    _, tokenizer, cfg = suite_files
    model = tiny_llama(len(tokenizer), 0, max_position_embeddings=256)
    prompts = [tokenizer(p)["input_ids"] for p in ("Harry went", "The wizard", "Once upon")]
    together = complete(model, tokenizer, prompts, cfg)
    assert complete(model, tokenizer, prompts[2:], cfg, first=2) == together[2:], "prompt 2 alone, as the third, samples alike"


def test_nonsense_evaluation_layouts_are_one_line_errors(suite_files, tmp_path, capsys):
    root, _, _ = suite_files
    for bad, fragment in ((["engine.workers=-1"], "engine.workers must be >= 0"), (["--workers", "-2"], "--workers")):
        code, _, err = obliviate("eval", "--model", root / "model", "--out", tmp_path / "run", "eval.tasks=[]", *bad, capsys=capsys)
        assert_one_line_error(code, err, fragment)
        assert not (tmp_path / "run").exists()
