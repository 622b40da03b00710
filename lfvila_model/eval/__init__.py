"""Evaluation for LF-VILA: retrieval metrics, the demo's temporal-order score, JSON and PNG reports, and the
drivers that run a model over validation data (`run`: retrieval, accuracy)."""
