"""cnc: build Compose-and-Conquer triplet shards and train CnC on them.

The top-level package holds what every part shares: the CLI entry point, logging set-up,
typed configuration helpers, model-resolution (fail-fast on missing weights) and the tiny
offline model builders used by tests and ``make demo MODELS=tiny``.
"""

__version__ = "0.1.0"
