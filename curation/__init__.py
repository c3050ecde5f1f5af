"""Duet curation."""
