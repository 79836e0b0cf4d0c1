"""Compression: settings and presets, the chunk loop, the JS-bounded search and the selection
methods."""
