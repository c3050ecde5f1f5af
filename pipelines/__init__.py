"""Duet pipelines."""
