"""`launcher.plan`: model shapes and parameter counts, DeepSpeed's ZeRO-3 estimate pinned to published figures,
the activation formula re-counted on a tiny Llama, plans that fit and do not, impossible plans (one line),
and the per-size configs. CPU only, no weights beyond tiny random models: the file runs in seconds.
"""

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from configs import CONFIG_DIR, load_config
from configs.errors import UserError
from engine.training.objectives import causal_lm_loss_sum
import kernels.device
from launcher.plan import GIB, LLAMAS, Shape, format_plan, main_plan, model_shape, plan, trainer_activations_bytes, zero3_states_gib

SIZES = ("llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b")
GIVEN = ["baseline=/x", "out=/y"]


def cfg_for(name: str, *overrides: str):
    return load_config(CONFIG_DIR / f"{name}.yaml", [*GIVEN, *overrides])


def one_line_error(excinfo) -> str:
    text = str(excinfo.value)
    assert text and "\n" not in text
    return text


# ---------------------------------------------------------------- shapes

@pytest.mark.parametrize("name, total", [("llama2-7b", 6.74e9), ("llama3-8b", 8.03e9), ("llama2-13b", 13.0e9),
                                         ("llama2-70b", 69.0e9), ("llama3-70b", 70.6e9)])
def test_table_parameter_counts_match_the_published_totals(name, total):
    shape = model_shape(name)
    assert shape.params == pytest.approx(total, rel=0.01)
    assert shape.largest_layer_params == shape.vocab * shape.hidden  # DeepSpeed's largest module: embeddings / LM head


def test_plan_uses_the_one_shape_table_the_kernels_share():
    assert LLAMAS is kernels.device.LLAMAS


def test_exact_llama2_7b_count_and_case_insensitive_names():
    assert model_shape("Llama2-7B").params == 6_738_415_616
    assert model_shape("llama3-8b").params == 8_030_261_248


@pytest.mark.parametrize("extra", [
    {},
    {"num_key_value_heads": 2},
    {"tie_word_embeddings": True},
    {"attention_bias": True, "mlp_bias": True, "head_dim": 24},
])
def test_model_shape_from_config_json_counts_like_the_model(tmp_path, extra):
    from deepspeed.runtime.zero.stage3 import model_to_params

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, **{"num_key_value_heads": 4, **extra})
    config.save_pretrained(tmp_path)
    model = LlamaForCausalLM(config)
    numel = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())  # tied weights once
    shape = model_shape(str(tmp_path))
    assert shape.name == tmp_path.name
    assert shape.params == numel
    assert (shape.params, shape.largest_layer_params) == model_to_params(model)
    assert shape.tie_embeddings == bool(extra.get("tie_word_embeddings"))


def test_activation_formula_matches_the_tensors_autograd_keeps():
    """Per decoder layer 20·h + 4·kv_dim + 8·I bytes a token in bf16, counted with saved-tensor hooks."""
    torch.manual_seed(0)
    tokens_per_row, rows = 64, 2

    def saved_bytes(layers: int) -> int:
        config = LlamaConfig(vocab_size=160, hidden_size=128, intermediate_size=352, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=tokens_per_row)
        model = LlamaForCausalLM(config).to(torch.bfloat16).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 160, (rows, tokens_per_row))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            causal_lm_loss_sum(model(input_ids=ids).logits, ids)
        return sum(seen.values())

    per_layer = (saved_bytes(3) - saved_bytes(1)) / 2
    shape = Shape("tiny", hidden=128, layers=1, heads=4, kv_heads=2, intermediate=352, vocab=160, params=0, largest_layer_params=0)
    layer_formula, _ = trainer_activations_bytes(shape, tokens_per_row * rows)
    assert per_layer == pytest.approx(layer_formula, rel=0.02)


# ---------------------------------------------------------------- DeepSpeed's estimate

def test_llama2_7b_model_states_on_8_gpus_pin_the_design_notes():
    """4·vocab·hidden + 18·params / 8 bytes: the estimator without offload (zero_init, buffer factor 1.5)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape = model_shape("llama2-7b")
    gpu_gib, _ = zero3_states_gib(shape, 8)
    assert gpu_gib == pytest.approx(14.6, abs=0.3)
    _, gpu, _ = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer_params, num_gpus_per_node=8, num_nodes=1,
                                                      cpu_offload=False, cpu_offload_params=False, zero_init=True, additional_buffer_factor=1.5)
    assert gpu_gib == pytest.approx(gpu / GIB)  # only the number of ranks matters for the GPU figure
    # The other published figures (docs/engine.md), same estimator.
    assert zero3_states_gib(model_shape("llama2-13b"), 8)[0] == pytest.approx(27.9, abs=0.3)
    assert zero3_states_gib(model_shape("llama2-70b"), 32)[0] == pytest.approx(37.1, abs=0.3)
    assert 2 * shape.params / GIB == pytest.approx(12.6, abs=0.1)  # a frozen 7B in bf16


# ---------------------------------------------------------------- plans

def test_llama2_7b_fits_one_node_of_8_80gib_gpus():
    p = plan(cfg_for("llama2-7b"), model_shape("llama2-7b"), 1, 8, 80)
    assert p.fits and p.min_nodes == 1 and p.min_nodes_workers == 4 and not p.offload
    assert p.trainer_states_gib == pytest.approx(zero3_states_gib(model_shape("llama2-7b"), 4)[0])
    assert p.labeler_models_gib == pytest.approx(2 * 2 * 6_738_415_616 / GIB)
    assert p.usable_gib == pytest.approx(72.0)
    text = format_plan(p)
    assert text.splitlines()[-1] == f"verdict: {p.verdict}" and p.verdict.startswith("fits on 1 node × 8 GPUs × 80 GiB")
    assert "128 blocks" in text and "NO" not in text


def test_a_plan_that_does_not_fit_names_its_smallest_cluster_and_offload():
    cfg = cfg_for("llama2-7b", "engine.workers=1", "engine.labelers=1")
    p = plan(cfg, model_shape("llama2-7b"), 1, 2, 80)
    assert not p.trainer_fits and p.labeler_fits
    # 2 nodes × 2 GPUs: 3 ranks hold 1/3 of the 18 bytes a parameter (38 GiB) + activations (24 GiB).
    assert (p.min_nodes, p.min_nodes_workers) == (2, 3)
    assert [o.what for o in p.offload] == ["optimizer → CPU", "optimizer + parameters → CPU"]
    assert p.offload[0].gpu_gib < p.trainer_gib and p.offload[1].gpu_gib < p.offload[0].gpu_gib
    assert p.offload[1].cpu_gib_per_node > 100  # 18 bytes a parameter × 1.5 on the node's CPU
    assert p.max_micro_batch == 0  # one rank's model states alone (113 GiB) exceed the GPU
    text = format_plan(p)
    assert "no micro-batch fits this layout without offload" in text
    assert "verdict: does not fit on 1 node × 2 GPUs × 80 GiB" in text
    assert "it fits from 2 nodes with engine.workers=3" in text and " NO" in text and "offload optimizer" in text


def test_nothing_fits_up_to_64_nodes_when_activations_alone_exceed_a_gpu():
    cfg = cfg_for("llama2-7b", "unlearn.micro_batch_size=64")
    p = plan(cfg, model_shape("llama2-7b"), 1, 8, 80)
    assert p.min_nodes is None and "no layout up to 64 nodes" in p.verdict
    assert p.max_micro_batch >= 8  # the configured 8 of reinforce fits: the unlearn phase sets the need


def test_a_labeler_that_does_not_fit_says_lower_the_label_batch():
    cfg = cfg_for("llama3-8b", "labels.impl=reference", "labels.batch_size=32")
    p = plan(cfg, model_shape("llama3-8b"), 1, 8, 80)
    assert p.trainer_fits and not p.labeler_fits
    assert "lower labels.batch_size" in p.verdict and p.verdict.startswith("does not fit")


def test_skipping_reinforce_plans_the_unlearn_micro_batch_only():
    cfg = cfg_for("llama2-7b", "reinforced=/r", "reinforce.micro_batch_size=64")
    p = plan(cfg, model_shape("llama2-7b"), 1, 8, 80)
    assert p.micro_batch == 8 and list(p.batches) == ["unlearn"] and p.fits


@pytest.mark.parametrize("overrides, cluster, words", [
    ((), (0, 8, 80), "at least 1 node"),
    ((), (1, 0, 80), "at least 1 node"),
    ((), (1, 8, 0), "positive number of GiB"),
    (("engine.labelers=8",), (1, 8, 80), "leaves no GPU for the trainer"),
    (("engine.workers=0",), (1, 8, 80), "engine.workers=4 uses every GPU"),
    (("engine.workers=8",), (1, 8, 80), "pass --nodes 2 or engine.workers=4"),
])
def test_impossible_plans_are_one_line_user_errors(overrides, cluster, words):
    with pytest.raises(UserError) as excinfo:
        plan(cfg_for("llama2-7b", *overrides), model_shape("llama2-7b"), *cluster)
    assert words in one_line_error(excinfo)


@pytest.mark.parametrize("name, labeler_gib", [("llama2-70b", 37.0), ("llama3-70b", 40.7)])
def test_70b_labelers_fit_only_sharded_over_a_node(name, labeler_gib):
    # Unsharded, the two frozen models need over 250 GiB on one GPU: refused, naming the shards that would do.
    with pytest.raises(UserError) as excinfo:
        plan(cfg_for(name, "engine.labelers=1", "engine.labeler_shards=1"), model_shape(name), 5, 8, 80)
    assert "two frozen bfloat16 models" in one_line_error(excinfo) and "engine.labeler_shards=4 or more" in one_line_error(excinfo)
    # The config's 8-way ZeRO-3 group: 1/8 of both models + both heads and two layers gathered.
    p = plan(cfg_for(name), model_shape(name), 5, 8, 80)
    shape = model_shape(name)
    head, layer = shape.vocab * shape.hidden, (shape.params - 2 * shape.vocab * shape.hidden) // shape.layers
    assert p.labeler_models_gib == pytest.approx((2 * shape.params * 2 // 8 + (2 * head + 2 * layer) * 2) / GIB)
    assert p.fits and p.labeler_gib == pytest.approx(labeler_gib, abs=0.05) and (p.workers, p.labelers, p.labeler_shards) == (32, 8, 8)
    # Too few shards for the usable memory: the advice is more shards, not a smaller label batch.
    p = plan(cfg_for(name, "engine.labelers=4", "engine.labeler_shards=4"), shape, 5, 8, 76)
    assert not p.labeler_fits and "raise engine.labeler_shards" in p.verdict


def test_unknown_models_and_bad_directories_are_one_line_user_errors(tmp_path):
    for baseline, words in (("gpt-5", "unknown model 'gpt-5'"), ("", "plan needs a baseline"), (str(tmp_path), "no config.json")):
        with pytest.raises(UserError) as excinfo:
            model_shape(baseline)
        assert words in one_line_error(excinfo)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(UserError) as excinfo:
        model_shape(str(tmp_path))
    assert "not a Llama-architecture config" in one_line_error(excinfo)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError) as excinfo:
        model_shape(str(tmp_path))
    assert "cannot read" in one_line_error(excinfo)


# ---------------------------------------------------------------- the per-size configs

@pytest.mark.parametrize("name", SIZES)
def test_llama_configs_load_with_the_papers_recipe_and_128_block_steps(name):
    cfg = cfg_for(name)
    whp = load_config(CONFIG_DIR / "whp.yaml", ["out=/y"])
    assert cfg.baseline == "/x" and cfg.dtype == "bfloat16" and cfg.labels.context_length == 512
    assert name in LLAMAS
    for phase in ("reinforce", "unlearn"):
        mine, paper = getattr(cfg, phase), getattr(whp, phase)
        assert (mine.lr, mine.epochs) == (paper.lr, paper.epochs)
        assert mine.micro_batch_size * mine.grad_accum * cfg.engine.workers == 128
    assert (cfg.labels.alpha, cfg.labels.alpha_multipliers) == (whp.labels.alpha, whp.labels.alpha_multipliers)


@pytest.mark.parametrize("name", SIZES)
def test_llama_configs_mark_baseline_and_out_mandatory(name):
    raw = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    assert OmegaConf.is_missing(raw, "baseline") and OmegaConf.is_missing(raw, "out")
    with pytest.raises(UserError, match="no value for out: pass --out"):  # out has no default: "???" holds
        load_config(CONFIG_DIR / f"{name}.yaml", ["baseline=/x"])


@pytest.mark.parametrize("name", SIZES)
def test_llama_configs_refuse_to_load_without_a_baseline(name):
    with pytest.raises(UserError, match="no value for baseline: pass --baseline"):
        load_config(CONFIG_DIR / f"{name}.yaml", ["out=/y"])


@pytest.mark.parametrize("name", ["llama2-7b", "llama2-13b", "llama3-8b"])
def test_main_plan_fits_the_small_configs_on_one_node(name):
    text = main_plan(CONFIG_DIR / f"{name}.yaml", 1, 8, 80)  # baseline from the file name, out not needed
    assert text.startswith(f"{name}: ") and "verdict: fits on 1 node × 8 GPUs × 80 GiB" in text


def test_main_plan_reads_a_model_directory_given_as_baseline(tmp_path):
    LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4).save_pretrained(tmp_path)
    text = main_plan(str(CONFIG_DIR / "llama2-7b.yaml"), 1, 8, 80, [f"baseline={tmp_path}"])
    assert text.startswith(f"{tmp_path.name}: ") and "verdict: fits" in text


def test_each_method_counts_its_own_frozen_models():
    """WHP's labelers hold two frozen models, NPO's reference teacher one, GA none (no teacher GPUs at all);
    a KL retain term and TA's task arithmetic put one more model, partitioned, on every trainer rank;
    a retain term doubles the tokens a micro-batch holds."""
    shape = model_shape("llama2-7b")
    width = 2  # bfloat16
    plans = {method: plan(load_config(CONFIG_DIR / "llama2-7b.yaml", ["out=x", "baseline=x", *extra]), shape, 1, 8, 80.0)
             for method, extra in {"whp": [], "npo": ["method=npo"], "ga": ["method=ga"], "ta": ["method=ta"],
                                   "graddiff-kl": ["method=graddiff", "loss.retain_loss=kl"]}.items()}
    assert plans["whp"].labeler_models_gib == pytest.approx(2 * shape.params * width / GIB)
    assert plans["npo"].labeler_models_gib == pytest.approx(shape.params * width / GIB) and plans["npo"].teacher_role == "reference"
    assert plans["ga"].labelers == 0 and plans["ga"].labeler_gib == 0 and "no teachers" in format_plan(plans["ga"])
    for method in ("ta", "graddiff-kl"):
        assert plans[method].trainer_frozen_gib == pytest.approx(shape.params * width / 4 / GIB)
    assert plans["whp"].trainer_frozen_gib == 0
    assert plans["graddiff-kl"].trainer_layers_gib == pytest.approx(2 * plans["ga"].trainer_layers_gib)
    assert "frozen reference model" in format_plan(plans["ta"])


def test_llama2_7b_evaluation_memory_by_hand():
    """4 ranks × bf16, eval batch 8 × 512 tokens: 1/4 of the weights, the gathered LM head and two decoder
    layers, one batch's layer working set and logits with fp32 log-probabilities; quant4 on the driver."""
    params, head = 6_738_415_616, 32000 * 4096
    layer = (params - 2 * head) // 32  # 202,383,488
    forward = 8 * 512 * (2 * (4 * 4096 + 3 * 11008) + (2 + 8) * 32000)
    p = plan(cfg_for("llama2-7b", "eval.attacks=[quant4]"), model_shape("llama2-7b"), 1, 8, 80.0)
    assert (p.workers, p.eval_batch, p.eval_length) == (4, 8, 512)
    assert p.eval_weights_gib * GIB == params * 2 / 4 == 3_369_207_808
    assert p.eval_gathered_gib * GIB == (head + 2 * layer) * 2 == 1_071_677_952
    assert p.eval_forward_gib * GIB == forward == 1_715_470_336
    assert p.eval_gib == pytest.approx(6_156_356_096 / GIB) and p.eval_fits
    assert p.attack_gib * GIB == pytest.approx(params * 2.5 + forward) and p.attack_fits
    text = format_plan(p)
    assert "evaluation: total per GPU" in text and "evaluation 5.7 GiB per GPU" in text and "attacks (quant4): driver" in text


@pytest.mark.parametrize("name, nodes", [("llama2-7b", 1), ("llama3-8b", 1), ("llama2-13b", 1), ("llama2-70b", 5), ("llama3-70b", 5)])
def test_every_llama_config_reports_where_its_evaluation_runs_and_its_memory(name, nodes):
    text = main_plan(CONFIG_DIR / f"{name}.yaml", nodes, 8, 80.0)
    assert "evaluation: total per GPU" in text and "ZeRO-3-partitioned over them" in text and "evaluation " in text.splitlines()[-1]


def test_an_evaluation_or_attack_that_does_not_fit_says_what_to_lower():
    p = plan(cfg_for("llama2-70b", "eval.batch_size=512", "eval.attacks=[relearn]"), model_shape("llama2-70b"), 5, 8, 80.0)
    assert not p.eval_fits and not p.attack_fits
    assert "lower eval.batch_size" in p.verdict and "drop eval.attacks" in p.verdict


def test_an_in_process_evaluation_counts_the_model_whole_on_the_drivers_gpu():
    p = plan(cfg_for("llama2-7b", "eval.in_process=true"), model_shape("llama2-7b"), 1, 8, 80.0)
    assert p.eval_weights_gib * GIB == 6_738_415_616 * 2 and p.eval_gathered_gib == 0
    assert "evaluation: in the driver on one GPU" in format_plan(p)


def test_offset_methods_count_the_trained_pair_the_frozen_models_and_no_logits():
    """offset-npo on llama2-70b with a llama2-7b pair, 32 trainer ranks, bf16: model states and activations are
    o′'s; M and o 1/32 each with both LM heads whole and two of M's layers gathered; M's no-grad layer working
    set and the three final hidden states; the offset kernel's workspace instead of logits. The evaluation holds
    M, o and o′ and three models' logits."""
    big, small = model_shape("llama2-70b"), model_shape("llama2-7b")
    cfg = cfg_for("llama2-70b", "method=offset-npo", "offset.small=llama2-7b")
    direct = plan(cfg_for("llama2-70b", "method=npo"), big, 5, 8, 80.0)
    p = plan(cfg, big, 5, 8, 80.0)
    ranks, tokens, width = 32, 1 * 512 * 2, 2  # each forget block bundled with a retain block
    assert (p.workers, p.small.name) == (ranks, "llama2-7b")
    assert p.trainer_states_gib == pytest.approx(zero3_states_gib(small, ranks)[0])
    assert p.trainer_layers_gib == pytest.approx(trainer_activations_bytes(small, tokens, width)[0] / GIB)
    big_layer = (big.params - 2 * 32000 * 8192) // 80
    frozen = (big.params + small.params) * width // ranks + 32000 * (8192 + 4096) * width + 2 * big_layer * width
    assert p.trainer_frozen_gib * GIB == frozen
    assert p.trainer_teacher_forward_gib * GIB == tokens * width * (4 * 8192 + 3 * 28672) + tokens * (8192 + 2 * 4096) * width
    assert p.trainer_loss_gib * GIB == kernels.device.offset_extra_bytes_estimate("auto", tokens, 8192, 4096, 32000, torch.bfloat16)
    assert p.trainer_gib < direct.trainer_gib and p.fits
    eval_tokens = 8 * 512
    assert p.eval_weights_gib * GIB == (big.params + 2 * small.params) * width // ranks
    assert p.eval_forward_gib * GIB == direct.eval_forward_gib * GIB + 2 * eval_tokens * (width + 4) * 32000
    text = format_plan(p)
    assert "o′ (llama2-7b) ZeRO-3 model states" in text and "offset kernel (no logits)" in text and "M + o + o′" in text


def test_an_offset_plan_needs_the_small_model():
    with pytest.raises(UserError) as e:
        plan(cfg_for("llama2-7b", "method=offset-ga"), model_shape("llama2-7b"), 1, 8, 80.0)
    assert "offset.small" in one_line_error(e)
    with pytest.raises(UserError) as e:
        plan(cfg_for("llama2-7b", "method=offset-ga", "offset.small=gpt-17"), model_shape("llama2-7b"), 1, 8, 80.0)
    assert "unknown model 'gpt-17'" in one_line_error(e)
