"""Experiments, data and the command-line interface (these parts use torch)."""
