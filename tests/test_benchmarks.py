"""lm-eval in process on local tasks (the tests write them): known accuracies, one-line errors."""

import json

import pytest

from builders import tiny_llama
from configs.schema import PAPER_TASKS
from engine.evaluation.benchmarks import load_tasks, run_benchmarks
from configs.errors import UserError

TASK = """task: {name}
dataset_path: json
dataset_name: null
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
metadata: {{version: 1.0}}
"""


def write_task(folder, name, docs, data=None):
    folder.mkdir(parents=True, exist_ok=True)
    data = data or folder / f"{name}.jsonl"
    if docs is not None:
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(TASK.format(name=name, data=data))
    return folder


def test_a_local_task_runs_on_the_model_in_memory_with_a_known_accuracy(tmp_path, sp_tokenizer):
    """Both choices are the same text, so their log-likelihoods tie and lm-eval picks the first: the
    accuracy is the share of documents whose answer is choice 0, whatever the (random) model."""
    docs = [{"question": f"what is the colour of the sky {i}", "choices": ["blue sky", "blue sky"], "answer": int(i == 2)} for i in range(3)]
    tasks = load_tasks(["tiny_mc"], [write_task(tmp_path / "tasks", "tiny_mc", docs)])
    model = tiny_llama(len(sp_tokenizer), 0, max_position_embeddings=256)
    scores = run_benchmarks(model, sp_tokenizer, tasks, batch_size=2)
    assert scores["tiny_mc"]["acc"] == pytest.approx(2 / 3)


def test_unknown_tasks_are_named_in_one_line(tmp_path):
    with pytest.raises(UserError, match="does not know the task\\(s\\) no_such_task_xyz"):
        load_tasks(["no_such_task_xyz"], [tmp_path])


def test_unreachable_task_data_is_a_one_line_error(tmp_path):
    folder = write_task(tmp_path / "tasks", "gone_mc", None, data=tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="benchmark task 'gone_mc': its data cannot be loaded") as error:
        load_tasks(["gone_mc"], [folder])
    assert "\n" not in str(error.value)


def test_the_paper_tasks_are_known_to_lm_eval():
    from engine.evaluation.benchmarks import task_manager

    assert set(PAPER_TASKS) <= set(task_manager().all_tasks)  # PAPER_TASKS are PAPER_ACCURACY's keys
