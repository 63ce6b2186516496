"""Generic-label logit mixing: `label = argmax(b − α·ReLU(r − b))` without materializing logits.

`generic_labels` is the one entry point; the engine never mixes logits itself. Behind `impl` sit the
plain PyTorch `reference` (materializes [N, V] logits, the ground truth), `chunked` (the vocabulary in
column chunks, O(N·chunk) memory; the CPU default) and a fused Triton kernel (the CUDA default).
"""

from kernels.mixing import generic_labels

__all__ = ["generic_labels"]
