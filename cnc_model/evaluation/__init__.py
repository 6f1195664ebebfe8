"""Evaluation of CnC pipelines on held-out triplets (``cnc eval``): the paper's metrics.

Modules: :mod:`~cnc_model.evaluation.models` (metric networks: sources, checks, tiny stand-ins),
:mod:`~cnc_model.evaluation.metrics` (the metrics), :mod:`~cnc_model.evaluation.run` (generation, reports),
:mod:`~cnc_model.evaluation.cli` (the command).
"""
