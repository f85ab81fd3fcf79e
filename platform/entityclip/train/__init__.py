"""Train: objective, checkpoints, MLflow tracking, and the Ray Train DDP loop."""
