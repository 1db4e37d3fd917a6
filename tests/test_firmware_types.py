"""Firmware type checks against each board's MicroPython stubs (mypy).

For every board, the files `edgeline node deploy` puts on it are checked with mypy against
that board's stub package (micropython-esp32-stubs, micropython-rp2-rpi-pico-w-stubs), laid
out as mypy's typeshed: then `time.ticks_ms`, `machine.I2C.readfrom_mem_into`,
`struct.pack_into`, ... are what the board's firmware has, and nothing of CPython's standard
library leaks in. Settings: tests/mypy-firmware.ini.

Findings in files whose owners have not fixed them yet are listed, with why they are no
board API misuse, in tests/firmware-types-baseline.txt: any finding not listed fails, and
so does a listed one that is gone (the list only shrinks).

The stub packages cannot share one environment (both install top-level machine.pyi,
time.pyi, ...), so each is installed with `pip install --target` into a cache folder
(EDGELINE_STUBS_CACHE, default ~/.cache/edgeline/micropython-stubs) the first time; that
needs PyPI once per version.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from edgeline.hil import deploy

REPO = Path(__file__).resolve().parents[1]
FIRMWARE = REPO / "firmware"
INI = Path(__file__).with_name("mypy-firmware.ini")
BASELINE = Path(__file__).with_name("firmware-types-baseline.txt")
# stub package, its pinned version (the boards' MicroPython), sys.platform on the board, boards
STUBS = {
    "esp32": ("micropython-esp32-stubs", "1.29.0.post1", "esp32", ("esp32", "esp32s3")),
    "rp2_pico_w": ("micropython-rp2-rpi-pico-w-stubs", "1.29.0.post1", "rp2", ("pico_w",)),
}


def installed_stubs(package: str, version: str) -> Path:
    root = Path(
        os.environ.get("EDGELINE_STUBS_CACHE") or Path.home() / ".cache" / "edgeline" / "micropython-stubs"
    )
    target = root / f"{package}-{version}"
    if (target / ".complete").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".installing-"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "--target",
            str(tmp),
            f"{package}=={version}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(f"cannot install {package}=={version} into {root} (needs PyPI once): {r.stderr[-2000:]}")
    (tmp / ".complete").touch()
    if target.exists():  # another run got there first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


def typeshed_from(stubs: Path, dest: Path) -> Path:
    """The stub package as a typeshed: its stdlib/ plus the board's modules, each in VERSIONS."""
    stdlib = dest / "stdlib"
    shutil.copytree(stubs / "stdlib", stdlib)
    versions = (stdlib / "VERSIONS").read_text()
    known = {line.split(":")[0].strip() for line in versions.splitlines() if ":" in line}
    added = []
    entries = [*stubs.iterdir(), *(stubs / "stubs").rglob("*.pyi")]
    for entry in entries:
        name = entry.name.removesuffix(".pyi")
        if (
            entry.name.startswith(".")
            or name in ("stdlib", "stubs")
            or entry.suffix in (".md", ".toml")
            or name.endswith(".dist-info")
            or name == "LICENSE"
        ):
            continue
        if entry.is_dir():
            shutil.copytree(entry, stdlib / entry.name, dirs_exist_ok=True)
        elif entry.suffix == ".pyi":
            shutil.copyfile(entry, stdlib / entry.name)  # the board's module wins over the reduced stdlib's
        else:
            continue
        if name not in known:
            added.append(f"{name}: 3.0-")
            known.add(name)
    (stdlib / "VERSIONS").write_text(versions + "\n# the board's own modules\n" + "\n".join(added) + "\n")
    return dest


def mypy() -> str:
    exe = shutil.which("mypy") or str(Path(sys.executable).parent / "mypy")
    if not Path(exe).exists():
        pytest.fail("mypy is not installed: pip install -e '.[dev]'")
    return exe


def mypy_on_board(
    stub_key: str, tmp_path: Path, targets: list[str], **run: Any
) -> subprocess.CompletedProcess[str]:
    """mypy (settings: INI) on `targets` as board `stub_key` sees them: against its stub
    package laid out as the typeshed, for its sys.platform. `run`: more for subprocess.run."""
    package, version, platform, _ = STUBS[stub_key]
    typeshed = typeshed_from(installed_stubs(package, version), tmp_path / "typeshed")
    return subprocess.run(
        [
            mypy(),
            "--config-file",
            str(INI),
            "--custom-typeshed-dir",
            str(typeshed),
            "--platform",
            platform,
            "--cache-dir",
            str(tmp_path / ".mypy"),
            *targets,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        **run,
    )


@pytest.mark.parametrize("stub_key", sorted(STUBS))
def test_firmware_type_checks_against_the_board_stubs(stub_key: str, tmp_path: Path) -> None:
    package, version, _, boards = STUBS[stub_key]
    files = sorted({str(src.relative_to(FIRMWARE)) for b in boards for src, _ in deploy.board_files(b)})
    r = mypy_on_board(
        stub_key,
        tmp_path,
        files,
        cwd=FIRMWARE,
        env={k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")},
    )
    last = (r.stdout.strip().splitlines() or [""])[-1]
    assert re.search(rf"(in|checked) {len(files)} source files\)?$", last), (
        r.stdout + r.stderr
    )  # it ran them all
    found = sorted(
        f"{m[1]}: {m[2]}" for m in re.finditer(r"^(\S+?):\d+: error: (.*)$", r.stdout, re.MULTILINE)
    )
    known = sorted(line for line in BASELINE.read_text().splitlines() if line and not line.startswith("#"))
    new = list(found)
    for line in known:
        if line in new:
            new.remove(line)
    gone = list(known)
    for line in found:
        if line in gone:
            gone.remove(line)
    assert not new, (
        f"mypy against {package} {version}: new findings (fix them):\n"
        + "\n".join(new)
        + f"\n\nfull output:\n{r.stdout}"
    )
    assert not gone, f"fixed, so remove from {BASELINE.name}:\n" + "\n".join(gone)


def test_the_check_sees_board_apis_and_refuses_cpython_only_ones(tmp_path: Path) -> None:
    """A check that cannot fail proves nothing: feed it code that is wrong on a board."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import time\nimport machine\n"
        "t = time.ticks_ms()\n"  # fine on a board
        "time.monotonic_ns()\n"  # CPython only
        "i2c = machine.I2C(0, freq=400000)\n"
        "i2c.readfrom_mem_into(0x53, 0x32, bytearray(6), 8)\n"  # addrsize is keyword-only
        "import threading\n"  # no such module on the board
    )
    r = mypy_on_board("esp32", tmp_path, [str(bad)])
    assert r.returncode == 1
    assert 'Module has no attribute "monotonic_ns"' in r.stdout
    assert 'Too many positional arguments for "readfrom_mem_into"' in r.stdout
    assert 'Cannot find implementation or library stub for module named "threading"' in r.stdout
    assert r.stdout.count("error:") == 3, r.stdout
