"""Stage 1: offline preprocessing into a bucketed store (the ``cogprep`` command)."""
