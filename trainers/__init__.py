"""Training and transfer code: models, per-worker loops, probes. Knows nothing of MLflow or studies."""
