"""Generic-label logit mixing: `label = argmax(b − α·ReLU(r − b))` without materializing logits.

`generic_labels` is the one entry point; the engine never mixes logits itself. Behind `impl` sit the
plain PyTorch `reference` (materializes [N, V] logits, the ground truth), `chunked` (the vocabulary in
column chunks, O(N·chunk) memory; the CPU default) and a fused Triton kernel (the CUDA default).
`token_log_probs` (log p of given next tokens from LM-head inputs, chunked likewise) serves NPO's reference.
"""

from kernels.log_probs import token_log_probs
from kernels.mixing import generic_labels

__all__ = ["generic_labels", "token_log_probs"]
