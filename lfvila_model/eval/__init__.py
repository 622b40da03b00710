"""Evaluation for LF-VILA: retrieval metrics, the demo's temporal-order score, JSON and PNG reports."""
