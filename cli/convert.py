"""`rsretrieve convert`: any checkpoint rsretrieve reads -> its own safetensors format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rsretrieve.cli._app import app, check_writable, console


@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="A CSMAE .ckpt/.pt/.pth, an rsretrieve or plain .safetensors file.")],
    out: Annotated[Path, typer.Argument(help="The .safetensors file to write (config and preprocessing in its metadata).")],
    model: Annotated[Optional[str], typer.Option("--model", help="Registered config the weights fit (needed for plain state dicts).")] = None,
) -> None:
    """Write a checkpoint in rsretrieve's own format, with its config and preprocessing inside."""
    from rsretrieve.models import load_model, save_model

    check_writable(out)
    loaded = load_model(checkpoint, config=model)
    path = save_model(loaded, out if out.suffix == ".safetensors" else out.with_suffix(".safetensors"))
    source = loaded.source
    variant = f", recognised as {source['variant']}" if source.get("variant") else ""
    console.print(f"{checkpoint} ({source.get('format', 'rsretrieve')}{variant}) → {path}: config "
                  f"[cyan]{loaded.config.name}[/], preprocessing [cyan]{loaded.config.preprocessing.name}[/]", highlight=False)
