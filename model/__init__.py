"""Duet model."""
