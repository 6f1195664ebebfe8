"""``cnc eval`` reports to the trackers of ``cnc train`` (``train.report_to``: TensorBoard, wandb, MLflow or none).

The trackers are accelerate's (the classes ``Accelerator(log_with=...)`` uses in training), opened on the main
process only, after scoring: each model's metrics are logged as ``eval/<model>/<metric>`` at the training step of
the evaluated weights (so an evaluation of ``checkpoint-2000`` lands at step 2000 beside the training curves), and
``grid.png`` as an image where the tracker takes images. TensorBoard writes to ``OUTPUT/logs/cnc-eval``.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)
RUN_NAME = "cnc-eval"


def check_report_to(report_to: str) -> None:
    """One line naming the missing package of the tracker (the trainer's check), before anything runs."""
    from cnc_model.training.config import check_tracker  # numpy (through triplets.quality): heavy

    check_tracker(report_to)


def source_record(source) -> dict:
    """What identifies an evaluated model in ``generation.json``: its folder, kind, step and weights; for a pipeline
    folder also the contents of ``model_index.json`` and ``cnc_export.json`` (a re-export changes them)."""
    record = {"path": str(source.path), "kind": source.kind, "step": source.step, "weights": source.weights}
    if source.kind == "pipeline":
        for name in ("model_index.json", "cnc_export.json"):
            f = Path(source.path) / name
            record[name] = f.read_text() if f.is_file() else None
    return record


def _open(report_to: str, logging_dir: Path, config: dict):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS  # accelerate: heavy

    cls = LOGGER_TYPE_TO_CLASS[report_to]
    tracker = cls(RUN_NAME, str(logging_dir)) if getattr(cls, "requires_logging_directory", False) else cls(RUN_NAME)
    tracker.start()
    tracker.store_init_configuration(config)
    return tracker


def report_metrics(report: dict, output: str | Path, report_to: str, *, step: int | None,
                   labels: list[str] | None = None, steps: dict[str, int | None] | None = None) -> dict[str, float]:
    """Log ``report`` (``metrics.json``) to ``report_to``; return the scalars logged (``eval/<model>/<metric>``).

    Args:
        step: the training step of the first model's weights (``None``: unknown, logged at 0).
        labels: the model names, in order (default: the report's).
        steps: per model, its weights' training step (default: ``step`` for every model).
    """
    if report_to == "none":
        return {}
    from cnc_model.evaluation.metrics import METRICS  # torch: heavy

    out = Path(output)
    results = report.get("models") or {report.get("model", "model"): report}
    labels = labels or list(results)
    config = {k: report[k] for k in ("n", "steps", "guidance_scale", "metric_models") if k in report}
    config["seeds"] = ",".join(map(str, report.get("seeds", [])))
    tracker = _open(report_to, out / "logs", config)
    logged: dict[str, float] = {}
    try:
        for label in labels:
            values = {f"eval/{label}/{k}": float(v) for k, v in results[label].items()
                      if k in METRICS and isinstance(v, (int, float))}
            at = (steps or {}).get(label, step) or 0
            tracker.log(values, step=at)
            logged.update(values)
        grid = out / "grid.png"
        if grid.is_file() and hasattr(tracker, "log_images"):
            import numpy as np
            from PIL import Image

            image = np.asarray(Image.open(grid).convert("RGB"))
            if report_to == "tensorboard":
                tracker.log_images({"eval/grid": image[None]}, step=step or 0, dataformats="NHWC")
            else:
                tracker.log_images({"eval/grid": [image]}, step=step or 0)
    finally:
        tracker.finish()
    logger.info("metrics reported to %s (%d values, step %s)", report_to, len(logged), step or 0)
    return logged


__all__ = ["check_report_to", "report_metrics", "source_record"]
