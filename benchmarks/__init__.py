"""Benchmarks: continual-learning accuracy (cil) and serving cost (serving), each printing numbers and saving JSON."""
