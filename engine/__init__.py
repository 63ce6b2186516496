"""The engine: `recipe` runs a method's phases; `methods/` (the seam and each method), `training/` (loop,
backends, checkpoints, runners), `data/` (corpora, anchors, translation, the tiny world), `evaluation/` (the
suite and report), `models` (loading, saving, heads). Imports run one way: see docs/engine.md."""
