"""Training: the loop every phase runs, its schedule, checkpoints, objectives and backends (torch, ZeRO-3), and the runners."""
