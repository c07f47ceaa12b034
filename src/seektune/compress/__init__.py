"""Compression: merge adapters, prune, distil, quantise and export, each step checked against the last."""
