"""Stage 2: a lean trainer that reads only cached tensors (the ``cogtrain`` command)."""
