"""Step progress that suits both a terminal and a job log.

On a TTY: a tqdm bar (with ``loss``/``lr`` in its postfix). Elsewhere (batch jobs, ``| tee``, CI): no carriage
returns; one log line every ``interval_s`` seconds or ``every_steps`` steps, and at the end::

    train local: step 120/1000 (12.0%) loss 0.1834 lr 1.00e-04 3.2 samples/s ETA 0:45:10
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("cnc.progress")


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class StepProgress:
    """Progress of ``total`` steps.

    Args:
        total: the last step.
        initial: the step to start from (resumes).
        desc: label of the bar / log lines.
        enabled: show anything at all (``False`` on non-main ranks).
        tty: force bar (``True``) or log lines (``False``); default: whether stderr is a terminal.
        interval_s / every_steps: log-line cadence off a TTY (whichever comes first; ``every_steps=None``: time only).
        samples_per_step: images per optimizer step, for samples/s.
        clock: time source (tests).
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True, tty: bool | None = None,
                 interval_s: float = 30.0, every_steps: int | None = None, samples_per_step: int = 1,
                 clock=time.monotonic):
        self.total, self.step, self.desc, self.enabled = total, initial, desc, enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.interval_s, self.every_steps, self.samples_per_step, self.clock = (interval_s, every_steps,
                                                                                samples_per_step, clock)
        self.start_step, self.t0 = initial, clock()
        self.last_log_t, self.last_log_step = self.t0, initial
        self.fields: dict[str, float] = {}
        self.bar = None
        if enabled and self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr)

    def rate(self) -> float:
        """Steps per second since the start."""
        elapsed = self.clock() - self.t0
        return (self.step - self.start_step) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        r = self.rate()
        return (self.total - self.step) / r if r > 0 else None

    def line(self) -> str:
        """The log line of the current state."""
        parts = [f"{self.desc}: step {self.step}/{self.total} ({100 * self.step / max(1, self.total):.1f}%)"]
        if "loss" in self.fields:
            parts.append(f"loss {self.fields['loss']:.4f}")
        if "lr" in self.fields:
            parts.append(f"lr {self.fields['lr']:.2e}")
        parts.append(f"{self.rate() * self.samples_per_step:.2f} samples/s ETA {fmt_eta(self.eta())}")
        return " ".join(parts)

    def set_fields(self, **fields: float) -> None:
        """Values (``loss=``...) shown with the next bar refresh / log line, without advancing."""
        self.fields.update(fields)

    def update(self, n: int = 1, **fields: float) -> None:
        """Advance ``n`` steps; ``fields`` (``loss=``, ``lr=``) are shown with the next bar refresh / log line."""
        self.step += n
        self.fields.update(fields)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.fields.items()}, refresh=False)
            return
        now = self.clock()
        due = now - self.last_log_t >= self.interval_s or (
            self.every_steps is not None and self.step - self.last_log_step >= self.every_steps)
        if due or self.step >= self.total:
            log.info("%s", self.line())
            self.last_log_t, self.last_log_step = now, self.step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.step != self.last_log_step:
            log.info("%s", self.line())
