"""`pipeline` commands of this area (see pipeline/cli.py)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the app."""
