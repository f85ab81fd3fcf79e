"""Train: the objective, precision, data ingest, reinforcement and the Ray Train DDP loop."""
