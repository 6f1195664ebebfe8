"""The base layer: errors, locations (local paths and fsspec URLs), atomic writes and file hashes.

It imports nothing from ``triplets``, ``pipelines``, ``cnc_model`` or ``jobs``; every other layer may import it.
"""
