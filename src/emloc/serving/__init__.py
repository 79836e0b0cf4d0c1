"""Answering from a task memory: emloc's decoding, the memory as a transformers Cache, attention
routing and plans, and the pipeline."""
