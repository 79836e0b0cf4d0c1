"""The task memory and its file: checksummed format, fingerprints, atomic output files."""
