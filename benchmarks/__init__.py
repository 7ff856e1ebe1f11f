"""Benchmarks of dinoreg next to the transformers reference: `python benchmarks/run.py`."""
