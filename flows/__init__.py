"""Duet flows."""
