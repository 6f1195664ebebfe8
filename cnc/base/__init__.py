"""The base layer: errors, locations (local paths and fsspec URLs) and atomic writes.

It imports nothing from ``triplets``, ``pipelines``, ``cnc_model`` or ``jobs``; every other layer may import it.
"""
