"""`pipeline` command line: each command parses flags, builds a config, calls jobs.*; no logic.

Commands live in pipeline/commands/<area>.py, each with a register(app) function, so the CLI
stays one small file per area. The vocabulary is docs/CLI.md.
"""

from __future__ import annotations

import logging
import sys

import typer

from pipeline.commands import bench, caption, score

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Caption large image collections offline with small vision-language models.")

for area in (caption, score, bench):
    area.register(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        logging.getLogger("pipeline").error("interrupted; committed shards are kept, re-run the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
