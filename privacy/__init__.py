"""DP-SGD (Opacus), accounting, the hash-chained ledger, budgets, the release gate's distances."""
