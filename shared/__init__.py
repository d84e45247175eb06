"""What both stages need: model variants and loading, buckets, the store format, fingerprints, config."""
