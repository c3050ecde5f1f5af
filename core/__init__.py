"""Duet core."""
