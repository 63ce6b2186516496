"""Hugging Face causal LMs: loading and saving with one-line errors, and reading their LM heads and final
hidden states (gathered under ZeRO-3) for the kernels, which apply the heads themselves.

A model directory is a Hugging Face one or an offset artifact (o′'s weights and offset.json naming M, o and α):
`check_model_dir` and `load_model` take either, so no caller asks which (`engine.offset_model`)."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from configs.errors import UserError, first_line
from engine.offset_model import OFFSET_RECORD, OffsetModel, OffsetRecord

IGNORE_INDEX = -100  # the Hugging Face causal-LM convention: a label position that is not trained


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but no CUDA device is available")
    return torch.device(name)


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype a config's `dtype` means on `device`: bf16 on GPU only (CPU kernels stay fp32)."""
    return torch.bfloat16 if name == "bfloat16" and device.type == "cuda" else torch.float32


def check_model_dir(path: str | Path, role: str) -> Path:
    """A Hugging Face causal-LM directory whose config, weights files and vocabulary agree, checked without
    loading the weights (headers only), so a broken model fails before anything is written. An offset
    artifact's M and o are checked too, and the three must share one vocabulary size."""
    path = _check_hf_dir(Path(path).expanduser(), role)
    record = OffsetRecord.read(path, role)
    if record is None:
        return path
    sizes = {}
    for name, part in (("baseline (M)", record.baseline), ("small model (o)", record.small)):
        if not part.is_dir():
            raise UserError(f"the {role} model {path} is an offset artifact whose {OFFSET_RECORD} names a {name} that does not exist: {part}")
        sizes[name] = config_vocab_size(_check_hf_dir(part, f"{role} offset artifact's {name}"))
    sizes["o′"] = config_vocab_size(path)
    if len(set(sizes.values())) > 1:
        raise UserError(f"the {role} offset artifact {path} adds the logits of models of different vocabularies: " + ", ".join(f"{name} {size}" for name, size in sizes.items()))
    return path


def config_vocab_size(model_dir: Path) -> int | None:
    """The vocabulary size a (checked) model directory's config.json states, without loading the model."""
    return json.loads((model_dir / "config.json").read_text()).get("vocab_size")


def _check_hf_dir(path: Path, role: str) -> Path:
    """One Hugging Face directory of `check_model_dir`."""
    if not (path / "config.json").is_file():
        raise UserError(f"{role} model not found: {path} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{role} model {path}: config.json is not readable JSON ({first_line(e)})") from None
    architectures = config.get("architectures") or [] if isinstance(config, dict) else None
    if architectures is None:
        raise UserError(f"{role} model {path}: config.json is not a JSON object")
    if architectures and not any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        raise UserError(f"{role} model {path} is a {architectures[0]}, not a causal language model")
    shapes = _weight_shapes(path, role)
    vocab = config.get("vocab_size")
    rows = {name: shape[0] for name, shape in shapes.items() if name.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight"))}
    for name, n in rows.items():
        if vocab is not None and n != vocab:
            raise UserError(f"{role} model {path}: config.json says vocab_size {vocab} but {name} has {n} rows")
    return path


def _weight_shapes(path: Path, role: str) -> dict[str, list[int]]:
    """Tensor shapes from the safetensors headers; a file shorter than its header promises is truncated."""
    files = sorted(path.glob("*.safetensors"))
    if not files and not any(path.glob("*.bin")):
        raise UserError(f"{role} model {path} has no weights (no .safetensors or .bin file)")
    shapes = {}
    for file in files:
        try:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise UserError(f"{role} model {path}: {file.name} is not a readable safetensors file ({first_line(e)})") from None
        if file.stat().st_size < 8 + size + end:
            raise UserError(f"{role} model {path}: {file.name} is truncated ({file.stat().st_size} of {8 + size + end} bytes)")
        shapes.update({key: entry["shape"] for key, entry in header.items() if key != "__metadata__"})
    return shapes


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, model_dir: Path, role: str) -> None:
    """Token ids index the embeddings: a tokenizer with more tokens than the model's vocabulary would fail mid-run."""
    vocab = config_vocab_size(model_dir)
    if vocab is not None and len(tokenizer) > vocab:
        raise UserError(f"the {role} tokenizer has {len(tokenizer)} tokens but the {role} model's vocabulary only {vocab} ({model_dir})")


def load_model(path: str | Path, role: str, device: torch.device, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model a directory holds, whole on `device`: a Hugging Face model, or an offset artifact's `OffsetModel`."""
    path = check_model_dir(path, role)
    parts = []
    for part in model_parts(path, role):
        try:
            parts.append(AutoModelForCausalLM.from_pretrained(part, dtype=dtype).to(device))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load {role} model from {part}: {first_line(e)}") from None
    return assemble(path, role, parts)


def model_parts(path: Path, role: str) -> list[Path]:
    """The Hugging Face directories a (checked) model directory is made of: itself, or an offset artifact's
    M, o and o′, in that order."""
    record = OffsetRecord.read(path, role)
    return [path] if record is None else [record.baseline, record.small, path]


def assemble(path: Path, role: str, parts: list[PreTrainedModel]) -> PreTrainedModel:
    """The model of `path` from its `model_parts` built by the caller (whole, or ZeRO-3-partitioned)."""
    record = OffsetRecord.read(path, role)
    return parts[0] if record is None else OffsetModel(*parts, alpha=record.alpha)


def convert_gguf(gguf_file: str | Path, out: str | Path) -> Path:
    """A GGUF checkpoint (llama.cpp's format) as a plain fp32 safetensors model directory: transformers
    dequantizes it on load, but a model that keeps its GGUF quantization config cannot be saved or trained."""
    gguf_file, out = Path(gguf_file), Path(out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise UserError(f"cannot read the GGUF model {gguf_file}: {first_line(e)}") from None
    config = loaded.config
    del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    save_model(model, tokenizer, out)
    return out


def load_tokenizer(path: str | Path, role: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(Path(path).expanduser())
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the {role} tokenizer from {path}: {first_line(e)}") from None
    if not tokenizer.is_fast:
        raise UserError(f"the {role} tokenizer at {path} is not a fast tokenizer; offsets are needed to translate anchors")
    return tokenizer


def check_same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, names: tuple[str, str]) -> None:
    """Generic labels compare two models token by token: their vocabularies must be identical."""
    if a.get_vocab() != b.get_vocab():
        raise UserError(f"the {names[0]} and {names[1]} models use different tokenizers (vocabularies of {len(a)} and {len(b)} tokens differ)")


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Write safetensors + tokenizer to a sibling temp dir, then swap it in: never a half-written model."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    except Exception as e:  # a full disk (safetensors reports it as its own error): no half-written copy left
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"cannot write the model {path}: {first_line(e)}") from e
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """LM-head inputs (after the final norm): the kernel applies the head itself, so logits never materialize here."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def head_weight(model) -> torch.nn.Parameter:
    """The LM-head weight parameter (under ZeRO-3 a shard: read it inside `lm_head_weights`)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UserError("the model's LM head has a bias; the kernels (generic labels, offset scores) support bias-free (Llama-class) heads only")
    return head.weight


@contextmanager
def lm_head_weights(*models) -> Iterator[list[torch.Tensor]]:
    """The full LM-head weights of `models` for the duration of the block.

    The kernel applies the heads itself, outside their modules' forward, so under DeepSpeed ZeRO-3 the
    partitioned weights must be gathered explicitly (as trl's `maybe_gather_lm_head_ctx` does); every
    rank must enter this together. Unsharded models pass through untouched.
    """
    weights = [head_weight(model) for model in models]
    partitioned = [w for w in weights if hasattr(w, "ds_id")]
    if not partitioned:
        yield weights
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield weights


@torch.no_grad()
def check_head_gives_logits(model, input_ids: torch.Tensor, role: str) -> None:
    """The kernels apply the head to the final hidden states themselves: refuse models that change logits afterwards.

    (Gemma-2's soft-capping or Cohere's logit scale would make the labels or the offset ensemble silently wrong.) The full
    forward runs outside `lm_head_weights`: under ZeRO-3 the head's own forward re-partitions its weight.
    """
    logits = model(input_ids=input_ids).logits.float()
    hidden = final_hidden_states(model, input_ids).float()
    with lm_head_weights(model) as (weight,):
        recomputed = hidden @ weight.float().T
    if not torch.allclose(logits, recomputed, rtol=1e-3, atol=1e-3 * float(logits.abs().max()) + 1e-4):
        raise UserError(f"the {role} model transforms its logits after the LM head (e.g. soft-capping); the kernels apply the head themselves and need plain head(hidden) logits")


def check_same_vocabulary(baseline, reinforced) -> None:
    """Labels index one vocabulary: both models must share it (a reinforced model of another base would not)."""
    shapes = [tuple(getattr(w, "ds_shape", w.shape)) for w in (head_weight(baseline), head_weight(reinforced))]
    sizes = [model.config.vocab_size for model in (baseline, reinforced)]
    if shapes[0] != shapes[1] or sizes[0] != sizes[1]:
        raise UserError(
            f"baseline and reinforced models differ: LM head {shapes[0]} vs {shapes[1]}, vocab_size {sizes[0]} vs {sizes[1]}"
        )
