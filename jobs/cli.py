"""Sub-commands of ``cnc`` that belong to ``jobs``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
