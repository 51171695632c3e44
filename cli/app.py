"""`pipeline`: the command line, the top layer. Each command parses its flags, builds a config and
calls jobs.* (or the core, for status/export); the work and its logic live below.

Commands are registered from cli/<area>.py (caption, manage, score, bench), one small file per
area, and each runs inside cli/guard.py's `guarded` (one-line errors, exit codes, signals).
The vocabulary is docs/CLI.md.
"""

from __future__ import annotations

import typer

from cli import bench, caption, manage, score

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Caption large image collections offline with small vision-language models.")


for area in (caption, manage, score, bench):
    area.register(app)


def main() -> None:
    app(prog_name="pipeline")


if __name__ == "__main__":
    main()
