"""Analyses of trained models (per-head attention statistics)."""
