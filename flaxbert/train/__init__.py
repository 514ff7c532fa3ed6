"""The training engine: optimizer, sharded/pmap train step, orbax checkpoints, metrics and the loop."""
