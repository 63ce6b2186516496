"""The `obliviate` command line, SLURM submission and `plan`; the engine it drives lives in engine/."""
