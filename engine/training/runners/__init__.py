"""Where a phase runs: in this process (`local`) or on Ray as a ZeRO-3 trainer group fed by teachers (`ray_runner`)."""
