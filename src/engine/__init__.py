"""Training and inference engines: schedule, optimizer, train step, checkpoints."""
