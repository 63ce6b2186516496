"""Fused LM-head kernels that never materialize [tokens × vocab] logits.

`generic_labels`: WHP's label mixing, `label = argmax(b − α·ReLU(r − b))`. Behind `impl` sit the plain
PyTorch `reference` (materializes [N, V] logits, the ground truth), `chunked` (the vocabulary in column
chunks, O(N·chunk) memory; the CPU default) and a fused Triton kernel (the CUDA default).
`offset_token_stats`: the offset ensemble z = z_M + α·(z_P − z_O)'s log p of given tokens and KL to M,
differentiable w.r.t. the trainable small model's hidden states and head only; the same three impls.
`token_log_probs` (log p of given next tokens from LM-head inputs, chunked likewise) serves NPO's reference.
"""

from kernels.log_probs import token_log_probs
from kernels.mixing import generic_labels
from kernels.offset import offset_token_stats

__all__ = ["generic_labels", "offset_token_stats", "token_log_probs"]
