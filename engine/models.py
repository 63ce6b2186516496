"""Loading and saving Hugging Face causal LMs and their tokenizers, with one-line errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from configs.errors import UserError, first_line


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but no CUDA device is available")
    return torch.device(name)


def check_model_dir(path: str | Path, role: str) -> Path:
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"{role} model not found: {path} is not a Hugging Face model directory (no config.json)")
    return path


def load_model(path: str | Path, role: str, device: torch.device, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    path = check_model_dir(path, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load {role} model from {path}: {first_line(e)}") from None
    return model.to(device)


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
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
