"""cogtune: fine-tuning pipeline for CogVideoX video models.

Stage 1, ``cogtune.preprocess`` (the ``cogprep`` command), encodes a dataset once into a bucketed,
content-keyed store. Stage 2, ``cogtune.train`` (the ``cogtrain`` command), trains on that store only.
``cogtune.shared`` holds what both stages need: model variants and loading, buckets, the store format,
fingerprints and configuration.
"""

__version__ = "0.1.0"
