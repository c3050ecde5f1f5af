"""Duet serve."""
