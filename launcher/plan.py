"""Will a config fit on a cluster? Per-GPU memory of the trainer ranks and the labelers (`obliviate plan`).

    obliviate plan configs/llama2-7b.yaml --nodes 1 --gpus-per-node 8 --gpu-mem 80

Estimates, before any GPU is rented; no weights are read (a model directory's config.json at most):

- **trainer model states**: DeepSpeed's own ZeRO-3 estimator (`estimate_zero3_model_states_mem_needs`,
  no offload, zero_init, buffer factor 1.5): 4·largest_layer + 18·params / ranks bytes per GPU.
  "Largest layer" is DeepSpeed's own notion (`model_to_params`: the module with the most parameters of
  its own), for a Llama the embedding or LM-head matrix, vocab·hidden. That reproduces the reference
  figure in docs/engine.md, Llama-2-7B on 8 GPUs ≈ 14.6 GiB. The estimator's GPU figure depends on the
  number of ranks only, so it is called with one GPU per "node" and `num_nodes` = ranks: its CPU figure
  is then per rank, and this module multiplies it by the ranks on the busiest node.
- **trainer activations** (per rank, no activation checkpointing, SDPA flash / memory-efficient
  attention, so no s² term): per token and per layer 20·h + 4·kv_dim + 8·I bytes in bf16, the tensors
  autograd keeps for a Hugging Face Llama decoder layer (counted with saved-tensor hooks; tests/test_plan.py
  re-counts it). Korthikanti et al. 2022's 34·h (GPT layer, 4h GeLU MLP) is 25% low for Llama-2-7B:
  SwiGLU keeps four I-wide tensors and RMSNorm keeps fp32 copies. Doubled for float32. Plus the loss at
  the LM head: 12 bytes per token per vocabulary entry (bf16 logits, their shifted copy, the fp32 copy
  and the fp32 log-probabilities kept for backward). Tokens = micro_batch_size · labels.context_length,
  the larger micro-batch of the phases that run (reinforce is skipped when `reinforced` is given).
- **labeler** (one GPU each): the frozen baseline and reinforced model (2 bytes a parameter each in bf16,
  4 in float32), divided by engine.labeler_shards when a group of that many shares them under ZeRO-3,
  which then also holds, gathered at once, both LM heads (the kernel's) and two decoder layers (the one
  running and the one prefetched); one forward's working set at labels.batch_size blocks, width·(4h + 3I)
  bytes a token (a layer's input and normed input, SwiGLU's gate/up/product), plus both models' final
  hidden states (the kernel's inputs); and the label kernel's workspace from
  `kernels.device.extra_bytes_estimate` for labels.impl ("auto" counts the larger, chunked, path).
- **evaluation** (after training, on a group laid out like the trainers: engine.workers ranks, one GPU
  each; engine/evaluation/ranks.py; with eval.in_process, in the driver on one GPU, the model whole): each evaluated model frozen and ZeRO-3-partitioned, 1/ranks of its
  weights (2 or 4 bytes a parameter), plus what ZeRO-3 holds gathered at once (the LM head and two decoder
  layers, the running and the prefetched one), plus one eval batch's forward: eval.batch_size sequences of
  the longer of eval.context_length (perplexity windows) and eval.sequence_length, width·(4h + 3I) bytes a
  token for the layer working set and (width + 8)·vocab for the logits with their fp32 log-probabilities.
  lm-eval batches at eval.batch_size too (its multiple-choice requests are short). The attacks
  (eval.attacks) run on the driver, the model whole: its weights plus the attacked copy (1 byte a parameter
  for quant8, ½ for quant4, width + 16 for relearn's fine-tuned copy with fp32 AdamW state) plus one
  forward, on one GPU.
- **offset methods** (offset-ga, offset-graddiff, offset-npo): the trainer trains o′ (`offset.small`: a model
  directory or a name of the shape table), so the model states and the decoder-layer activations are o′'s; it
  also holds M and o frozen, 1/ranks each, plus full copies of both their LM heads (gathered once per phase)
  and two of M's decoder layers gathered while M runs; one no-grad forward of M's layer working set and the
  final hidden states of the three models; the loss is the offset kernel's workspace
  (`kernels.device.offset_extra_bytes_estimate`), no logits. An offset artifact's evaluation holds all three
  models, 1/ranks each, and three models' logits per batch.
- **fits** when a GPU's total stays under `gpu_mem_gib` less 10% headroom (CUDA context, NCCL buffers,
  allocator fragmentation). `gpu_mem_gib` is GiB as the device reports it (an "80 GB" H100 shows 79.2).

The plan uses the config's engine.workers, engine.labelers and engine.labeler_shards. The smallest node
count uses every GPU that is not a labeler for the trainer (workers = nodes · gpus_per_node − labelers);
the labeler's need does not change with nodes. Unsharded labelers whose two frozen models cannot fit one
GPU are refused with the smallest engine.labeler_shards that would fit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from configs import RunConfig, load_config
from configs.errors import UserError, first_line
from engine.methods import method_class, uses_offset_pair
from kernels.device import LLAMAS, extra_bytes_estimate, offset_extra_bytes_estimate

GIB = float(1 << 30)
HEADROOM = 0.10  # of the GPU's memory, kept free for the CUDA context, NCCL and fragmentation
MAX_NODES = 64  # the smallest-node search stops here
LOGIT_BYTES = 12  # per token per vocabulary entry at the loss (see the module docstring)
FORBIDDEN_PER_ROW = 1  # forbidden ids per row passed to the kernel estimate (only `reference` depends on it)


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture model's dimensions and parameter counts (DeepSpeed's `largest_layer_params`)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    params: int
    largest_layer_params: int
    tie_embeddings: bool = False
    head_dim: int = 0  # 0: hidden // heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)


def llama_shape(name: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                tie_embeddings: bool = False, head_dim: int = 0, attention_bias: bool = False, mlp_bias: bool = False) -> Shape:
    """A `Shape` with its parameters counted by the Llama formula: embeddings; per layer q/o (heads·head_dim)
    and k/v (kv_heads·head_dim) projections, gate/up/down MLP and two RMSNorm vectors; the final norm; the
    LM head unless tied to the embeddings."""
    hd = head_dim or hidden // heads
    q, kv = heads * hd, kv_heads * hd
    attention = 2 * hidden * q + 2 * hidden * kv + ((q + 2 * kv + hidden) if attention_bias else 0)
    mlp = 3 * hidden * intermediate + ((2 * intermediate + hidden) if mlp_bias else 0)
    params = vocab * hidden * (1 if tie_embeddings else 2) + layers * (attention + mlp + 2 * hidden) + hidden
    largest = max(vocab * hidden, hidden * intermediate + (intermediate if mlp_bias else 0),  # one module's own
                  hidden * q + (max(q, hidden) if attention_bias else 0))  # weights and bias: q or o projection
    return Shape(name, hidden, layers, heads, kv_heads, intermediate, vocab, params, largest, tie_embeddings, head_dim)


def model_shape(baseline: str) -> Shape:
    """From a model directory's config.json (no weights loaded), else from the built-in table (LLAMAS)."""
    known = ", ".join(LLAMAS)
    if not baseline:
        raise UserError(f"plan needs a baseline: baseline=DIR (a Hugging Face model directory) or one of {known}")
    path = Path(baseline).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise UserError(f"no config.json in {path}: give a Hugging Face model directory or one of {known}")
        try:
            c = json.loads(config.read_text())
            heads = int(c["num_attention_heads"])
            return llama_shape(path.name, int(c["hidden_size"]), int(c["num_hidden_layers"]), heads,
                               int(c.get("num_key_value_heads") or heads), int(c["intermediate_size"]), int(c["vocab_size"]),
                               bool(c.get("tie_word_embeddings", False)), int(c.get("head_dim") or 0),
                               bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False)))
        except KeyError as e:
            raise UserError(f"{config} has no {e.args[0]!r}: not a Llama-architecture config") from None
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise UserError(f"cannot read {config}: {first_line(e)}") from None
    key = baseline.strip().lower()
    if key in LLAMAS:
        return llama_shape(key, *LLAMAS[key])
    raise UserError(f"unknown model {baseline!r}: give a model directory with a config.json, or one of {known}")


# ---------------------------------------------------------------- estimates

def zero3_states_gib(shape: Shape, ranks: int, offload_optimizer: bool = False, offload_params: bool = False) -> tuple[float, float]:
    """(GPU GiB per rank, CPU GiB per rank) of ZeRO-3 model states over `ranks` GPUs, from DeepSpeed's estimator."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        shape.params, shape.largest_layer_params, num_gpus_per_node=1, num_nodes=ranks,
        cpu_offload=offload_optimizer, cpu_offload_params=offload_params, zero_init=True, additional_buffer_factor=1.5)
    return gpu / GIB, cpu / GIB


def trainer_activations_bytes(shape: Shape, tokens: int, width: int = 2) -> tuple[int, int]:
    """(decoder layers, loss at the LM head) activation bytes of one rank's forward + backward over `tokens`."""
    per_token_layer = 20 * shape.hidden + 4 * shape.kv_dim + 8 * shape.intermediate
    return shape.layers * per_token_layer * tokens * width // 2, LOGIT_BYTES * shape.vocab * tokens


def labeler_bytes(shape: Shape, tokens: int, impl: str, alphas: int, width: int = 2, shards: int = 1, models: int = 2, kernel: bool = True) -> tuple[int, int, int]:
    """(the frozen models — this GPU's 1/shards of them, plus what ZeRO-3 holds gathered when sharded —,
    one forward's activations + the models' final hidden states, label kernel workspace — or, for a teacher
    without the kernel (NPO's reference), the fp32 logits and log-probabilities of one batch)."""
    held = models * shape.params * width // shards
    if shards > 1:
        head = shape.vocab * shape.hidden
        layer = (shape.params - 2 * head) // shape.layers
        held += models * (head + layer) * width
    forward = tokens * width * (4 * shape.hidden + 3 * shape.intermediate) + models * tokens * shape.hidden * width
    if not kernel:
        return held, forward, 2 * 4 * tokens * shape.vocab
    dtype = torch.bfloat16 if width == 2 else torch.float32
    return held, forward, extra_bytes_estimate(impl, tokens, shape.hidden, shape.vocab, dtype, alphas, FORBIDDEN_PER_ROW)


def _head_and_layer(shape: Shape) -> tuple[int, int]:
    """Parameters of the LM head and of one decoder layer."""
    head = shape.vocab * shape.hidden
    return head, (shape.params - 2 * head) // shape.layers


def evaluation_bytes(shape: Shape, ranks: int, tokens: int, width: int = 2, small: Shape | None = None) -> tuple[int, int, int]:
    """(a rank's 1/ranks of the evaluated model, what ZeRO-3 holds gathered at once, one eval batch's forward
    with fp32 log-probabilities) on an evaluation rank (see the module docstring); with `small`, of an offset
    artifact: M, o and o′, and the logits of all three."""
    head, layer = _head_and_layer(shape)
    gathered = (head + 2 * layer) * width if ranks > 1 else 0
    forward = tokens * (width * (4 * shape.hidden + 3 * shape.intermediate) + (width + 8) * shape.vocab)
    if small is None:
        return shape.params * width // ranks, gathered, forward
    forward += 2 * tokens * (width + 4) * small.vocab  # o's and o′'s logits, and their fp32 sum with M's
    return (shape.params + 2 * small.params) * width // ranks, gathered, forward


def offset_trainer_bytes(shape: Shape, small: Shape, ranks: int, tokens: int, impl: str, width: int = 2) -> tuple[int, int, int]:
    """(M and o frozen — 1/ranks each, both LM heads whole, two of M's layers gathered —, the no-grad forward
    of M's layer working set and the three models' final hidden states, the offset kernel's workspace) on a
    trainer rank of an offset method (o′'s model states and layer activations are counted as a trained model's)."""
    head, layer = _head_and_layer(shape)
    frozen = (shape.params + small.params) * width // ranks + (head + small.vocab * small.hidden) * width
    if ranks > 1:
        frozen += 2 * layer * width
    forward = tokens * width * (4 * shape.hidden + 3 * shape.intermediate) + tokens * (shape.hidden + 2 * small.hidden) * width
    dtype = torch.bfloat16 if width == 2 else torch.float32
    return frozen, forward, offset_extra_bytes_estimate(impl, tokens, shape.hidden, small.hidden, shape.vocab, dtype)


ATTACK_BYTES_PER_PARAM = {"quant8": 1.0, "quant4": 0.5}  # the quantized copy; relearn: width + 16 (see the module docstring)


def attack_bytes(shape: Shape, attacks: list[str], tokens: int, width: int = 2, small: Shape | None = None) -> int:
    """The driver's GPU during the costliest attack: the model whole, its attacked copy and one forward. An
    offset artifact is M, o and o′: quantization copies all three, relearning o′ alone (M and o are shared)."""
    if not attacks:
        return 0
    params = shape.params + (2 * small.params if small else 0)
    copies = [params * ATTACK_BYTES_PER_PARAM[attack] if attack in ATTACK_BYTES_PER_PARAM else (small or shape).params * (width + 16) for attack in attacks]
    return int(params * width + max(copies)) + evaluation_bytes(shape, 1, tokens, width, small)[2]


# ---------------------------------------------------------------- the plan

@dataclass
class Offload:
    """The trainer with part of ZeRO-3's model states in CPU memory (DeepSpeed's estimate)."""

    what: str
    gpu_gib: float  # trainer total per GPU, activations included
    cpu_gib_per_node: float
    fits: bool


@dataclass
class Plan:
    shape: Shape
    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    workers: int
    labelers: int  # teacher processes (0 when the method has none)
    labeler_shards: int
    block: int
    label_batch: int
    label_impl: str
    dtype: str
    batches: dict[str, tuple[int, int]]  # phase -> (micro, accum): effective batch = micro × accum × workers
    trainer_states_gib: float
    trainer_layers_gib: float
    trainer_loss_gib: float
    trainer_cpu_gib_per_node: float
    labeler_models_gib: float
    labeler_forward_gib: float
    labeler_kernel_gib: float
    min_nodes: int | None  # smallest node count whose trainer fits (workers = nodes·gpus_per_node − labelers)
    method: str = "whp"
    teacher_role: str = "labeler"  # how the method's teacher processes are named ("" without teachers)
    teacher_models: tuple[str, ...] = ("baseline", "reinforced")  # the frozen models each one holds
    rows_per_block: int = 1  # 2 when each forget block is bundled with a retain block
    trainer_frozen_gib: float = 0.0  # frozen models a trainer rank holds partitioned (a KL term's baseline, TA/TAU's θ_ref, offset's M and o)
    small: Shape | None = None  # offset methods: o / o′, the model the trainer trains
    trainer_teacher_forward_gib: float = 0.0  # offset methods: M's no-grad forward and the three final hidden states
    eval_ranks: int = 1  # the evaluation group's ranks
    eval_in_driver: bool = False  # eval.in_process: the driver, the model whole
    eval_batch: int = 0  # eval.batch_size
    eval_length: int = 0  # tokens of the longest evaluated sequence (perplexity window or forget sequence)
    eval_weights_gib: float = 0.0  # an evaluation rank's 1/workers of the model
    eval_gathered_gib: float = 0.0
    eval_forward_gib: float = 0.0
    attacks: tuple[str, ...] = ()
    attack_gib: float = 0.0  # on the driver's one GPU (0 without attacks)
    offload: list[Offload] = field(default_factory=list)  # only when the trainer does not fit
    max_micro_batch: int = 0  # largest micro-batch that fits this layout when the configured one does not

    @property
    def usable_gib(self) -> float:
        return self.gpu_mem_gib * (1 - HEADROOM)

    @property
    def micro_batch(self) -> int:
        """The larger micro-batch of the phases that run: it sets the trainer's activations."""
        return max(m for m, _ in self.batches.values())

    @property
    def min_nodes_workers(self) -> int:
        return self.min_nodes * self.gpus_per_node - self.labelers if self.min_nodes else 0

    @property
    def trainer_gib(self) -> float:
        return self.trainer_states_gib + self.trainer_frozen_gib + self.trainer_layers_gib + self.trainer_teacher_forward_gib + self.trainer_loss_gib

    @property
    def labeler_gib(self) -> float:
        return self.labeler_models_gib + self.labeler_forward_gib + self.labeler_kernel_gib

    @property
    def eval_gib(self) -> float:
        return self.eval_weights_gib + self.eval_gathered_gib + self.eval_forward_gib

    @property
    def eval_fits(self) -> bool:
        return self.eval_gib <= self.usable_gib

    @property
    def attack_fits(self) -> bool:
        return self.attack_gib <= self.usable_gib

    @property
    def trainer_fits(self) -> bool:
        return self.trainer_gib <= self.usable_gib

    @property
    def labeler_fits(self) -> bool:
        return self.labeler_gib <= self.usable_gib

    @property
    def fits(self) -> bool:
        return self.trainer_fits and self.labeler_fits and self.eval_fits and self.attack_fits

    @property
    def verdict(self) -> str:
        where = f"{_nodes(self.nodes)} × {self.gpus_per_node} GPUs × {self.gpu_mem_gib:g} GiB"
        usable = f"{self.usable_gib:.1f} usable"
        if self.fits:
            teacher = f", {self.teacher_role} {self.labeler_gib:.1f} GiB" if self.labelers else ""
            text = f"fits on {where}: trainer {self.trainer_gib:.1f} GiB{teacher}, evaluation {self.eval_gib:.1f} GiB per GPU of {usable}"
            idle = self.nodes * self.gpus_per_node - self.workers - self.labelers
            return text + (f"; {idle} GPU(s) idle (engine.workers={self.workers + idle} would use them)" if idle else "")
        parts = []
        if not self.trainer_fits:
            part = f"the trainer needs {self.trainer_gib:.1f} GiB per GPU of {usable}"
            if self.min_nodes is None:
                part += f"; no layout up to {MAX_NODES} nodes fits it: lower micro_batch_size or offload"
            elif self.min_nodes == self.nodes and self.min_nodes_workers > self.workers:
                part += f"; engine.workers={self.min_nodes_workers} (every GPU) fits here"
            else:
                part += f"; it fits from {_nodes(self.min_nodes)} with engine.workers={self.min_nodes_workers}"
            parts.append(part)
        if not self.labeler_fits:
            fix = "raise engine.labeler_shards" if self.labeler_models_gib > self.usable_gib else "lower labels.batch_size"
            parts.append(f"a {self.teacher_role} needs {self.labeler_gib:.1f} GiB of {usable}: {fix}")
        if not self.eval_fits:
            parts.append(f"an evaluation rank needs {self.eval_gib:.1f} GiB of {usable}: lower eval.batch_size")
        if not self.attack_fits:
            parts.append(f"the attacks need the model whole on the driver's GPU, {self.attack_gib:.1f} GiB of {usable}: drop eval.attacks")
        return f"does not fit on {where}: " + "; ".join(parts)


def plan(cfg: RunConfig, shape: Shape, nodes: int, gpus_per_node: int, gpu_mem_gib: float, small: Shape | None = None) -> Plan:
    """Per-GPU memory of the config's trainer ranks and labelers on `nodes` × `gpus_per_node` GPUs of `gpu_mem_gib`;
    `small`: offset methods' o / o′ (default: `model_shape(offset.small)`)."""
    if nodes < 1 or gpus_per_node < 1:
        raise UserError(f"a cluster needs at least 1 node and 1 GPU per node, got {nodes} node(s) × {gpus_per_node} GPU(s)")
    if not (gpu_mem_gib > 0 and math.isfinite(gpu_mem_gib)):
        raise UserError(f"GPU memory must be a positive number of GiB, got {gpu_mem_gib}")
    method = method_class(cfg.method)(cfg)
    if uses_offset_pair([cfg.method]) and small is None:
        if not cfg.offset.small:
            raise UserError(f"method {cfg.method} trains o′ from offset.small: give offset.small=DIR (a Hugging Face model directory) or one of {', '.join(LLAMAS)}")
        small = model_shape(cfg.offset.small)
    elif not uses_offset_pair([cfg.method]):
        small = None
    engine, total = cfg.engine, nodes * gpus_per_node
    workers, shards = engine.workers, engine.labeler_shards
    labelers = engine.labelers if method.teacher_models else 0  # a method without teachers starts none
    if labelers >= total:
        raise UserError(f"engine.labelers={labelers} leaves no GPU for the trainer on {nodes} node(s) × {gpus_per_node} GPUs")
    if workers < 1:
        raise UserError(f"engine.workers={workers} trains in this process without DeepSpeed: plan needs trainer ranks "
                        f"(engine.workers={total - labelers} uses every GPU that is not a labeler)")
    width = 2 if cfg.dtype == "bfloat16" else 4
    models = len(method.teacher_models)
    models_gib = models * shape.params * width / GIB
    if models_gib / shards > gpu_mem_gib:
        least = math.ceil(models_gib / (gpu_mem_gib * (1 - HEADROOM)))
        held = f"two frozen {cfg.dtype} models" if models == 2 else f"frozen {cfg.dtype} model"
        raise UserError(f"{shape.name}: a {method.teacher_role} holds {'its' if shards == 1 else f'1/{shards} of its'} {held} "
                        f"({models_gib / shards:.1f} GiB > {gpu_mem_gib:g} GiB a GPU): shard them with engine.labeler_shards={least} "
                        f"or more (engine.labelers a multiple of it)")
    if workers + labelers > total:
        need = math.ceil((workers + labelers) / gpus_per_node)
        raise UserError(f"engine.workers={workers} + engine.labelers={labelers} need {workers + labelers} GPUs but "
                        f"{nodes} node(s) × {gpus_per_node} have {total}: pass --nodes {need} or engine.workers={total - labelers}")

    usable = gpu_mem_gib * (1 - HEADROOM)
    block = cfg.labels.context_length
    phases = [phase for phase in method.phases if not (phase == "reinforce" and cfg.reinforced)]
    batches = {phase: (getattr(cfg, method.train_sections[phase]).micro_batch_size, getattr(cfg, method.train_sections[phase]).grad_accum) for phase in phases}
    micro = max(m for m, _ in batches.values())
    rows = 2 if method.uses_retain else 1  # bundled forget + retain blocks

    trained = small or shape  # offset methods train o′

    def trainer_parts(ranks: int, micro_batch: int, offload=(False, False)) -> tuple[float, float, float, float, float, float]:
        """GiB per trainer rank: model states, frozen models, layer activations, teacher forward, loss; CPU per rank."""
        tokens = micro_batch * block * rows
        states, cpu = zero3_states_gib(trained, ranks, *offload)
        layers, loss = trainer_activations_bytes(trained, tokens, width)
        if small is None:
            return states, method.trainer_frozen_models * shape.params * width / ranks / GIB, layers / GIB, 0.0, loss / GIB, cpu
        frozen, forward, kernel = offset_trainer_bytes(shape, small, ranks, tokens, cfg.labels.impl, width)
        return states, frozen / GIB, layers / GIB, forward / GIB, kernel / GIB, cpu

    def trainer_total(ranks: int, micro_batch: int, offload=(False, False)) -> float:
        return sum(trainer_parts(ranks, micro_batch, offload)[:5])

    states_gib, frozen_trainer_gib, layers_gib, teacher_forward_gib, loss_gib, cpu_per_rank = trainer_parts(workers, micro)
    models_b, forward_b, kernel_b = labeler_bytes(shape, cfg.labels.batch_size * block, cfg.labels.impl, len(cfg.labels.alphas), width, shards, models, method.teacher_role == "labeler")
    if not labelers:
        models_b = forward_b = kernel_b = 0
    eval_length = max(cfg.eval.context_length, cfg.eval.sequence_length)
    eval_tokens = cfg.eval.batch_size * eval_length
    eval_ranks = 1 if cfg.eval.in_process else workers  # eval.in_process: the driver, the model whole
    eval_b = evaluation_bytes(shape, eval_ranks, eval_tokens, width, small)
    min_nodes = next((n for n in range(1, MAX_NODES + 1)
                      if n * gpus_per_node > labelers and trainer_total(n * gpus_per_node - labelers, micro) <= usable), None)
    result = Plan(
        shape=shape, nodes=nodes, gpus_per_node=gpus_per_node, gpu_mem_gib=gpu_mem_gib,
        workers=workers, labelers=labelers, labeler_shards=shards, block=block, label_batch=cfg.labels.batch_size,
        label_impl=cfg.labels.impl, dtype=cfg.dtype, batches=batches,
        trainer_states_gib=states_gib, trainer_layers_gib=layers_gib, trainer_loss_gib=loss_gib,
        trainer_cpu_gib_per_node=cpu_per_rank * min(workers, gpus_per_node),
        labeler_models_gib=models_b / GIB, labeler_forward_gib=forward_b / GIB, labeler_kernel_gib=kernel_b / GIB,
        min_nodes=min_nodes, method=cfg.method, teacher_role=method.teacher_role, teacher_models=method.teacher_models,
        rows_per_block=rows, trainer_frozen_gib=frozen_trainer_gib, small=small, trainer_teacher_forward_gib=teacher_forward_gib,
        eval_ranks=eval_ranks, eval_in_driver=cfg.eval.in_process, eval_batch=cfg.eval.batch_size, eval_length=eval_length,
        eval_weights_gib=eval_b[0] / GIB, eval_gathered_gib=eval_b[1] / GIB, eval_forward_gib=eval_b[2] / GIB,
        attacks=tuple(cfg.eval.attacks), attack_gib=attack_bytes(shape, cfg.eval.attacks, eval_tokens, width, small) / GIB,
    )
    if not result.trainer_fits:
        per_node = min(workers, gpus_per_node)
        for what, flags in (("optimizer → CPU", (True, False)), ("optimizer + parameters → CPU", (True, True))):
            gpu = trainer_total(workers, micro, flags)
            result.offload.append(Offload(what, gpu, zero3_states_gib(trained, workers, *flags)[1] * per_node, gpu <= usable))
        result.max_micro_batch = next((m for m in range(micro - 1, 0, -1) if trainer_total(workers, m) <= usable), 0)
    return result


# ---------------------------------------------------------------- output

def format_plan(p: Plan) -> str:
    """A table (component, GiB per GPU, fits?), the effective batches, suggestions, and the one-line verdict."""
    s = p.shape
    yes = {True: "yes", False: "NO"}
    tokens = f"{p.micro_batch} × {p.rows_per_block * p.block} tokens"
    if p.small is None:
        trainer = [
            (f"trainer: ZeRO-3 model states over {p.workers} ranks", p.trainer_states_gib, ""),
            *([(f"trainer: frozen reference model, 1/{p.workers} ({p.dtype})", p.trainer_frozen_gib, "")] if p.trainer_frozen_gib else []),
            (f"trainer: activations, {tokens}", p.trainer_layers_gib, ""),
            (f"trainer: logits + loss ({s.vocab:,} vocab)", p.trainer_loss_gib, ""),
        ]
    else:
        trainer = [
            (f"trainer: o′ ({p.small.name}) ZeRO-3 model states over {p.workers} ranks", p.trainer_states_gib, ""),
            (f"trainer: M and o frozen, 1/{p.workers} each + both LM heads ({p.dtype})", p.trainer_frozen_gib, ""),
            (f"trainer: o′ activations, {tokens}", p.trainer_layers_gib, ""),
            ("trainer: M's forward + three final hidden states", p.trainer_teacher_forward_gib, ""),
            ("trainer: offset kernel (no logits)", p.trainer_loss_gib, ""),
        ]
    rows = [*trainer, ("trainer: total per GPU", p.trainer_gib, yes[p.trainer_fits])]
    role = p.teacher_role
    evaluated = "model" if p.small is None else "M + o + o′"
    if p.labelers:
        rows += [
            (f"{role}: {' + '.join(p.teacher_models)} ({p.dtype})" + (f", 1/{p.labeler_shards} + gathered head/layers (ZeRO-3)" if p.labeler_shards > 1 else ""), p.labeler_models_gib, ""),
            (f"{role}: forward, {p.label_batch} × {p.block} tokens", p.labeler_forward_gib, ""),
            (f"{role}: label kernel ({p.label_impl})" if role == "labeler" else f"{role}: fp32 logits + log-probabilities", p.labeler_kernel_gib, ""),
            (f"{role}: total per GPU", p.labeler_gib, yes[p.labeler_fits]),
        ]
    rows += [
        (f"evaluation: {evaluated} 1/{p.eval_ranks} ({p.dtype}), ZeRO-3" if not p.eval_in_driver else f"evaluation: {evaluated} whole ({p.dtype}), driver", p.eval_weights_gib, ""),
        *([("evaluation: gathered LM head + 2 layers", p.eval_gathered_gib, "")] if p.eval_gathered_gib else []),
        (f"evaluation: forward, {p.eval_batch} × {p.eval_length} tokens + fp32 log-probs" + (" (three models' logits)" if p.small else ""), p.eval_forward_gib, ""),
        ("evaluation: total per GPU", p.eval_gib, yes[p.eval_fits]),
    ]
    if p.attacks:
        rows.append((f"attacks ({', '.join(p.attacks)}): driver, model whole + copy", p.attack_gib, yes[p.attack_fits]))
    width = max(len(r[0]) for r in rows)
    lines = [
        f"{s.name}: {s.params / 1e9:.2f}B parameters (hidden {s.hidden}, {s.layers} layers, {s.heads}/{s.kv_heads} heads, vocab {s.vocab:,})",
        f"cluster: {_nodes(p.nodes)} × {p.gpus_per_node} GPUs × {p.gpu_mem_gib:g} GiB ({p.usable_gib:.1f} GiB usable, "
        f"{HEADROOM:.0%} headroom); method {p.method}: {p.workers} trainer ranks" + (f" + {p.labelers} {role}{'s' * (p.labelers > 1)}" if p.labelers else ", no teachers") + ", one GPU each"
        + (f" (ZeRO-3 groups of {p.labeler_shards})" if p.labeler_shards > 1 else ""),
        "",
        f"{'component':<{width}}  {'GiB/GPU':>8}  fits?",
        f"{'-' * width}  {'-' * 8}  -----",
        *(f"{name:<{width}}  {gib:8.1f}  {fit}".rstrip() for name, gib, fit in rows),
        "",
        "effective batch (micro × accum × workers): " + ", ".join(
            f"{phase} {m} × {a} × {p.workers} = {m * a * p.workers} blocks" for phase, (m, a) in p.batches.items()),
        f"trainer CPU memory per node (DeepSpeed, no offload): {p.trainer_cpu_gib_per_node:.1f} GiB",
        (f"evaluation: after training, on {p.eval_ranks} ranks laid out like the trainers (one GPU each), each model "
         f"ZeRO-3-partitioned over them; lm-eval runs whole on every rank; " if not p.eval_in_driver else
         "evaluation: in the driver on one GPU, each model whole (eval.in_process); ")
        + (f"the attacks run on the driver with the model whole, on one GPU" if p.attacks else "no attacks (eval.attacks)"),
    ]
    if p.min_nodes is not None:
        lines.append(f"smallest cluster for the trainer: {_nodes(p.min_nodes)} with engine.workers={p.min_nodes_workers}")
    for o in p.offload:
        lines.append(f"offload {o.what}: trainer {o.gpu_gib:.1f} GiB per GPU ({yes[o.fits].lower()}), "
                     f"{o.cpu_gib_per_node:.0f} GiB CPU per node (engine.deepspeed: a JSON with zero_optimization.offload_*)")
    if not p.trainer_fits:
        lines.append(f"micro_batch_size={p.max_micro_batch} fits this layout (raise grad_accum to keep the batch)"
                     if p.max_micro_batch else "no micro-batch fits this layout without offload")
    lines.append(f"verdict: {p.verdict}")
    return "\n".join(lines)


def _nodes(n: int) -> str:
    return f"{n} node{'s' * (n != 1)}"


def main_plan(config_path: str | Path, nodes: int, gpus_per_node: int, gpu_mem_gib: float, overrides: list[str] = ()) -> str:
    """`obliviate plan CONFIG --nodes N --gpus-per-node G --gpu-mem GIB [KEY=VALUE]...`: the formatted plan.

    Neither `out` nor a baseline directory is needed to plan: without `baseline`, the shape the config is
    `sized_for` (configs/llama2-7b.yaml: llama2-7b) is planned; baseline=DIR reads that model's config.json.
    """
    given = {item.split("=", 1)[0].strip() for item in overrides}
    placeholder = [] if "out" in given else ["out=plan"]
    cfg = load_config(config_path, [*placeholder, *overrides], not_required=("baseline",))
    return format_plan(plan(cfg, model_shape(cfg.baseline or cfg.sized_for), nodes, gpus_per_node, gpu_mem_gib))
