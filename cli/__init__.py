"""The `rsretrieve` command line: parses, calls the library, prints (one module per command).

    from rsretrieve.cli import app          # typer.testing.CliRunner().invoke(app, [...])
"""

from __future__ import annotations

import sys

from rsretrieve.cli._app import app, err, set_log_level
from rsretrieve.errors import RSRetrieveError

# the commands register themselves on `app`
from rsretrieve.cli import convert, encode, evaluate, export, info, query, verify  # noqa: E402,F401  (isort: skip)


def main() -> None:
    """Entry point: bad input is one line on stderr and exit code 1, never a traceback."""
    import warnings

    from rich.markup import escape

    # the library warns about random weights through warnings/logging; the CLI prints its own banner
    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
    set_log_level(0)  # -v raises it
    try:
        app()
    except RSRetrieveError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 1))  # 130 for an encode stopped by Ctrl-C
    except OSError as exc:  # a file the user named cannot be read or written
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        err.print(f"[bold red]error:[/] {escape(where + str(exc.strerror or exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)


__all__ = ["app", "main"]
