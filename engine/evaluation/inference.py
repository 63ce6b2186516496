"""Running a model for evaluation, shared by every metric of the suite and by the LLM judge.

Forward passes under `inference` (eval mode, no gradients, the model's mode restored after), in batches
with a progress bar (`batches`), give fp32 next-token log-probabilities of token sequences
(`next_token_log_probs`, right-padded); `generate` decodes continuations of prompts with
`model.generate` (left-padded by `left_padded`, with `pad_token_id`). On the ranks of a ZeRO-3 group,
`in_lockstep` keeps ranks that make different numbers of forward passes in step, and `share` says which
items each rank measures. This module imports none of the other evaluation modules: they all import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from tqdm import tqdm

from configs.errors import UserError


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the duration, then the model's previous mode back (it may be mid-training)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter, where its inputs go."""
    return next(model.parameters()).device


def batches(items: list, batch_size: int, desc: str) -> Iterator[list]:
    """Consecutive slices of `items`, with a progress bar on interactive terminals."""
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=None):
        yield items[start : start + batch_size]


def next_token_log_probs(model, sequences: list[list[int]], batch_size: int, desc: str) -> Iterator[torch.Tensor]:
    """Per sequence, in order: fp32 log-probabilities of the next token at each position, `[len, vocab]`.

    Sequences are right-padded: a causal model's real positions never see the padding after them. Call it
    under `inference`.
    """
    device = model_device(model)
    for batch in batches(sequences, batch_size, desc):
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        log_probs = logits.float().log_softmax(-1)
        for row, seq in enumerate(batch):
            yield log_probs[row, : len(seq)]


def left_padded(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) [len(batch), longest], padded on the left so generation continues right
    after each sequence."""
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def pad_token_id(tokenizer) -> int:
    """The id to pad generation batches with: the tokenizer's pad token, else its eos, else its unk."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if token_id is not None:
            return token_id
    raise UserError("the tokenizer has no pad, eos or unk token to pad generation batches with")


def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, desc: str, **options) -> list[str]:
    """The decoded continuation (new tokens only, special tokens skipped) of each token-id prompt, in order.

    Batches are left-padded with `pad_token_id(tokenizer)` and run through `model.generate(**options)`
    under `inference`; `options` say how to decode (max_new_tokens, sampling, a GenerationConfig, the
    pad id generation itself uses).
    """
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    completions: list[str] = []
    with inference(model):
        for batch in batches(prompts, batch_size, desc):
            ids, mask = left_padded(batch, pad_id)
            # synced_gpus=False: on a ZeRO-3 rank `in_lockstep` keeps the forwards in step, generate's own sync would collide.
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), synced_gpus=False, **options)
            completions += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return completions


def share(count: int, batch_size: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous share of `count` items: a balanced run of whole batches of `batch_size`, so
    every batch a rank runs is one the single process runs too (same rows, same padding, same numbers)."""
    batches = -(-count // batch_size)
    base, extra = divmod(batches, world)
    first = rank * base + min(rank, extra)
    last = first + base + (rank < extra)
    return slice(min(first * batch_size, count), min(last * batch_size, count))


class _Lockstep:
    """The forward pre-hook and the padding loop behind `in_lockstep`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.padding = model, False
        # Ahead of DeepSpeed's own hooks, so the announcement precedes the forward's first gather on every rank.
        self.hook = model.register_forward_pre_hook(self.announce, prepend=True)

    def busy_ranks(self, busy: int) -> int:
        flag = torch.tensor([busy], dtype=torch.long, device=model_device(self.model))
        dist.all_reduce(flag)
        return int(flag.item())

    def announce(self, module, args) -> None:
        if not self.padding:
            self.busy_ranks(1)

    def finish(self) -> None:
        """Padding forwards (one token) while any other rank still makes real ones; then every rank is done."""
        self.padding = True
        padding = torch.zeros(1, 1, dtype=torch.long, device=model_device(self.model))
        with torch.no_grad():
            while self.busy_ranks(0):
                self.model(input_ids=padding)


@contextmanager
def in_lockstep(model: torch.nn.Module) -> Iterator[None]:
    """Any forward passes on each rank of a ZeRO-3 group, however many, kept in step with the other ranks'.

    Under ZeRO-3 every forward gathers each layer's shards from all ranks, so a rank that makes one forward
    fewer leaves the others waiting forever. Ranks measuring their own shares make different numbers (a last
    short batch, a longer greedy decode, `generate` stopping early): before each forward a rank announces it
    in an all-reduce, and a rank whose work is done runs one-token padding forwards until no rank announces
    any more. One scalar all-reduce per forward; `generate` must not sync by itself (synced_gpus=False). An
    error leaves the others waiting: the caller tears the group down.
    """
    step = _Lockstep(model)
    try:
        yield
        step.finish()
    finally:
        step.hook.remove()
