"""The WHP unlearning method: tiny world, anchors, generic labels, training loop, evaluation."""
