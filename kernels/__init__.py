"""Generic-label logit mixing: `label = argmax(b − α·ReLU(r − b))` without materializing logits.

`generic_labels` is the one entry point; the engine never mixes logits itself. Today only the
plain PyTorch reference exists; the chunked and fused Triton paths plug in behind `impl`.
"""

from kernels.mixing import generic_labels

__all__ = ["generic_labels"]
