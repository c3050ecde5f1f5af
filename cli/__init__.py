"""The ``duet`` command line."""
