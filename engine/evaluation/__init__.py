"""The evaluation suite: familiarity, perplexity, memorization, membership inference, oracle closeness, lm-eval; the report."""
