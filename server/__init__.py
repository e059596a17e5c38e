"""The Flower ServerApp: aggregation, consortium ledger, checkpoints, MLflow, release orchestration."""
