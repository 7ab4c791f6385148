"""Dynamic batcher: per-model queues -> batches that fit one optimization profile -> executor slots."""
