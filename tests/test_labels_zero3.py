"""Generic labels from models sharded by real DeepSpeed ZeRO-3 equal those of the unsharded models.

Under ZeRO-3 the LM-head weight is an empty shard outside its module's forward; the label builder must
gather it (`lm_head_weights`). This runs DeepSpeed for real (CPU accelerator, gloo, one rank) in a
subprocess, so the distributed state never leaks into the test process. The first run on a machine
JIT-compiles DeepSpeed's shared-memory comm op (≈ 1 min); later runs reuse it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_labels_under_zero3_match_unsharded(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561"}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "labels match" in proc.stdout


def _main(workdir: Path) -> None:
    import deepspeed
    import torch
    from transformers import LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    sys.path.insert(0, str(Path(__file__).parent))
    from builders import tiny_llama, word_tokenizer

    from configs import LabelConfig
    from engine.data.corpus import make_blocks
    from engine.methods.generic_labels import build_labels

    words = "went to Hogwarts with Harry and Ron the castle Jon Mystic Academy John school"
    tokenizer = word_tokenizer(words)
    text = " ".join(["went to Hogwarts with Harry and Ron", "Harry and Ron went to the castle"] * 6)
    blocks = make_blocks([text], tokenizer, context_length=12)
    anchors = {"Harry": ["Jon", "John"], "Hogwarts": ["Mystic Academy", "the school"]}
    cfg = LabelConfig(context_length=12, batch_size=2)
    for name, seed in (("baseline", 0), ("reinforced", 1)):
        tiny_llama(len(tokenizer), seed).save_pretrained(workdir / name)
    plain = build_labels(*(LlamaForCausalLM.from_pretrained(workdir / n).eval() for n in ("baseline", "reinforced")), tokenizer, blocks, anchors, cfg, progress=False)

    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    keep_alive = HfDeepSpeedConfig(ds_config)  # from_pretrained builds under zero.Init while this lives
    engines = [deepspeed.initialize(model=LlamaForCausalLM.from_pretrained(workdir / n), config=ds_config)[0] for n in ("baseline", "reinforced")]
    head = engines[0].module.lm_head.weight
    assert head.numel() == 0 and hasattr(head, "ds_id"), "the head must really be a ZeRO-3 shard"
    sharded = build_labels(engines[0].module, engines[1].module, tokenizer, blocks, anchors, cfg, progress=False)
    del keep_alive
    assert torch.equal(sharded.labels, plain.labels), "labels differ under ZeRO-3"
    print("labels match", tuple(sharded.labels.shape))


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
