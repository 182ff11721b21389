"""The line every benchmark table starts with: when, on what, under which load."""

from __future__ import annotations

import os
import platform
import time


def machine_line() -> str:
    import torch

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores (load {load}), Python {platform.python_version()}, torch {torch.__version__}"
