"""Automatic compression: sensitivity analysis and budgeted search for per-group sparsity."""
