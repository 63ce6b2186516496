"""The `obliviate` command line, and (in later issues) the Ray and SLURM glue."""
