"""`edgeline node deploy` (hil/deploy.py) without a board.

No board is attached here and mpremote cannot drive the unix port over a serial line, so
these tests check everything up to that line: the file set per board, the .mpy
cross-compile for each board's CPU (header bytes), that the staged package imports and runs
under the MicroPython unix port, the board-side clean-up code under the unix port, the exact
mpremote command line printed by --dry-run, that mpremote's own parser hands each command
the arguments meant for it, and, with the serial line replaced by the unix port in a folder
(micropython_board.py), that mpremote really copies the files and the node boots from them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from edgeline.hil import deploy

from micropython_runner import FIRMWARE, micropython_binary

# mpy-cross -march values and the arch code an .mpy with native code carries in header byte 2.
ARCH_CODES = {"x64": 2, "armv6m": 4, "armv7emsp": 7, "xtensawin": 10}


def board_paths(board: str) -> set[str]:
    return {dest for _, dest in deploy.board_files(board)}


def test_each_board_gets_its_own_hal_and_not_the_others() -> None:
    every = {p.relative_to(FIRMWARE).as_posix() for p in (FIRMWARE / "edgeline_node").rglob("*.py")}
    for board, own, other in (
        ("esp32", "hal_esp32.py", "hal_rp2040.py"),
        ("esp32s3", "hal_esp32.py", "hal_rp2040.py"),
        ("pico_w", "hal_rp2040.py", "hal_esp32.py"),
    ):
        got = board_paths(board)
        assert {
            "boot.py",
            "main.py",
            "edgeline_node/__init__.py",
            "edgeline_node/hal.py",
            "edgeline_node/hal_board.py",
            "edgeline_node/drivers/adxl345.py",
            f"edgeline_node/{own}",
        } <= got
        assert f"edgeline_node/{other}" not in got
        assert "edgeline_node/hal_stdin.py" not in got  # the HIL rig's, for the unix port only
        assert got - {"boot.py", "main.py"} == every - {
            f"edgeline_node/{other}",
            "edgeline_node/hal_stdin.py",
        }
    assert "__init__.py" not in board_paths("esp32")  # firmware/__init__.py is the host package's


def write_config(tmp_path: Path, **over: Any) -> Path:
    cfg = {"node_id": "node-7", "machine": "pump-07", "broker": {"host": "192.0.2.10"}}
    cfg.update(over)
    path = tmp_path / "node.json"
    path.write_text(json.dumps(cfg))
    return path


def dry_run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    rc = deploy.main([*argv, "--dry-run"])
    out = capsys.readouterr()
    return rc, out.out.splitlines(), out.err


def test_dry_run_prints_the_exact_mpremote_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "certs").mkdir()
    for name in ("ca.der", "node.der", "node.key.der"):
        (tmp_path / "certs" / name).write_bytes(b"\x30\x82")
    config = write_config(
        tmp_path,
        broker={
            "host": "broker.plant",
            "port": 8883,
            "tls": {"ca": "certs/ca.der", "cert": "certs/node.der", "key": "certs/node.key.der"},
        },
        hal={"kind": "rp2040", "rate_hz": 500, "accel": {"chip": "mpu6050"}},
    )
    stage = tmp_path / "stage"
    rc, lines, err = dry_run(
        ["--port", "/dev/ttyACM0", "--board", "pico_w", "--config", str(config), "--stage", str(stage)],
        capsys,
    )
    assert rc == 0, err
    assert len(lines) == 1  # no compile step without --mpy
    argv = shlex.split(lines[0])
    cp = ["+", "fs", "cp"]
    assert argv == [
        "mpremote",
        "connect",
        "/dev/ttyACM0",
        "exec",
        deploy.board_prep(["certs"]),
        *cp,
        "-r",
        str(stage / "edgeline_node"),
        ":edgeline_node",
        *cp,
        str(FIRMWARE / "boot.py"),
        ":boot.py",
        *cp,
        str(FIRMWARE / "main.py"),
        ":main.py",
        *cp,
        str(config),
        ":config.json",
        *cp,
        str(tmp_path / "certs" / "ca.der"),
        ":certs/ca.der",
        *cp,
        str(tmp_path / "certs" / "node.der"),
        ":certs/node.der",
        *cp,
        str(tmp_path / "certs" / "node.key.der"),
        ":certs/node.key.der",
        "+",
        "reset",
    ]
    staged = {p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()}
    assert staged == board_paths("pico_w") - {"boot.py", "main.py"}
    assert "29 files" in err or "files for pico_w staged" in err


def test_mpremote_accepts_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mp_main = pytest.importorskip("mpremote.main", reason="mpremote is not installed: pip install mpremote")
    rc, lines, _ = dry_run(
        [
            "--port",
            "u0",
            "--board",
            "esp32",
            "--config",
            str(write_config(tmp_path)),
            "--stage",
            str(tmp_path / "s"),
            "--no-reset",
        ],
        capsys,
    )
    assert rc == 0
    seen: list[tuple[str, dict[str, Any]]] = []

    def recorder(name: str) -> Any:
        def handler(state: Any, args: argparse.Namespace) -> None:
            state.did_action()
            seen.append((name, {k: v for k, v in vars(args).items() if k != "next_command"}))

        return handler

    commands = {name: (recorder(name), parser) for name, (_, parser) in mp_main._COMMANDS.items()}
    monkeypatch.setattr(mp_main, "_COMMANDS", commands)
    monkeypatch.setattr(sys, "argv", shlex.split(lines[-1]))
    assert mp_main.main() == 0
    names = [n for n, _ in seen]
    assert names == ["connect", "exec", "fs", "fs", "fs", "fs"]
    assert seen[0][1]["device"] == ["/dev/ttyUSB0"]  # mpremote's own "u0" shortcut
    assert seen[1][1]["expr"] == [deploy.board_prep([])]
    assert seen[2][1]["command"] == ["cp"] and seen[2][1]["recursive"] is True
    assert seen[2][1]["path"] == [str(tmp_path / "s" / "edgeline_node"), ":edgeline_node"]
    assert [a["path"][-1] for _, a in seen[3:]] == [":boot.py", ":main.py", ":config.json"]
    assert not any(a.get("force") for _, a in seen[2:])  # unchanged files are skipped by hash


@pytest.mark.parametrize("board", sorted(deploy.BOARDS))
def test_mpy_cross_compiles_for_the_boards_cpu(
    board: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage = tmp_path / "stage"
    rc, lines, err = dry_run(["--port", "auto", "--board", board, "--mpy", "--stage", str(stage)], capsys)
    assert rc == 0, err
    arch = deploy.BOARDS[board].arch
    compiles = [shlex.split(line) for line in lines[:-1]]
    assert compiles and all(f"-march={arch}" in c for c in compiles)
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    assert {p.suffix for p in files} == {".mpy"}
    assert {p.relative_to(stage).with_suffix(".py").as_posix() for p in files} == board_paths(board) - {
        "boot.py",
        "main.py",
    }
    for p in files:
        head = p.read_bytes()[:4]
        assert head[:2] == b"M\x06", p  # .mpy format 6 (MicroPython >= 1.20)
        # Bytecode-only modules carry no arch and load anywhere; native (viper) code is tagged.
        assert head[2] >> 2 in (0, ARCH_CODES[arch]), p
    viper = stage / "edgeline_node" / "tflite_model.mpy"
    assert viper.read_bytes()[2] >> 2 == ARCH_CODES[arch]


def test_the_staged_mpy_package_runs_under_the_unix_port(tmp_path: Path) -> None:
    """Compiled for the unix port's own CPU (x64), the staged tree imports and runs a node window."""
    if os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("the x64 .mpy needs an x86-64 unix port")
    deploy.stage("esp32", tmp_path, mpy=True, arch="x64")
    assert not list(tmp_path.rglob("*.py"))
    names = sorted(
        p.relative_to(tmp_path).with_suffix("").as_posix().replace("/", ".") for p in tmp_path.rglob("*.mpy")
    )
    script = f"""
import json
from array import array
for name in {[n for n in names if not n.endswith("__init__")]!r}:
    __import__(name)
from edgeline_node.config import validate
from edgeline_node.hal import make_hal
import edgeline_node.config as c
hal = make_hal(validate({{"node_id": "n", "machine": "m"}})["hal"])
bufs = [array("f", [0.0] * 64) for _ in hal.sensors()]
hal.read_window(bufs)
print(json.dumps({{"file": c.__file__, "sensors": len(bufs), "rms_ok": max(bufs[0]) > 0.1}}))
"""
    env = dict(os.environ, MICROPYPATH=f"{tmp_path}:.frozen")
    r = subprocess.run(
        [micropython_binary(), "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out == {"file": f"{tmp_path}/edgeline_node/config.mpy", "sensors": 3, "rms_ok": True}


def test_board_prep_code_runs_on_micropython(tmp_path: Path) -> None:
    board = tmp_path / "board"
    (board / "edgeline_node" / "drivers").mkdir(parents=True)
    (board / "edgeline_node" / "drivers" / "adxl345.py").write_text("x = 1\n")
    (board / "edgeline_node" / "node.mpy").write_bytes(b"M\x06")
    (board / "config.json").write_text("{}")
    code = deploy.board_prep(["certs", "certs/node"])
    for _ in range(2):  # the second time on a board that has no package any more
        r = subprocess.run(
            [micropython_binary(), "-c", code], cwd=board, capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.relative_to(board).as_posix() for p in board.rglob("*")) == [
        "certs",
        "certs/node",
        "config.json",
    ]


@pytest.mark.parametrize(
    ("board", "cfg", "message"),
    [
        (
            "pico_w",
            {"hal": {"kind": "esp32", "adc": {"pin": 34}}},
            r"config key 'hal.kind' is 'esp32', which does not run on board 'pico_w': use 'rp2040' or 'sim'",
        ),
        (
            "esp32",
            {"hal": {"kind": "esp32"}},
            r"node.json: config key 'hal.kind' 'esp32' needs at least one sensor",
        ),
        ("esp32", {"node_id": "bad id"}, r"node.json: config key 'node_id' must be"),
        (
            "esp32",
            {"broker": {"host": "b", "tls": {"ca": "/etc/ca.der"}}},
            r"'broker.tls.ca' is '/etc/ca.der': deploy copies TLS files next to config.json",
        ),
        (
            "esp32",
            {"broker": {"host": "b", "tls": {"ca": "ca.der"}}},
            r"'broker.tls.ca' names .*ca.der, which does not exist",
        ),
    ],
)
def test_bad_configs_are_refused_before_the_board_is_touched(
    board: str, cfg: dict[str, Any], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, lines, err = dry_run(
        ["--port", "auto", "--board", board, "--config", str(write_config(tmp_path, **cfg))], capsys
    )
    assert rc == 2
    assert lines == []
    assert err.startswith("edgeline node deploy: ")
    import re

    assert re.search(message, err), err


def test_add_parser_hooks_into_the_node_subcommands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="edgeline")
    node = parser.add_subparsers(dest="command").add_parser("node").add_subparsers(dest="node_cmd")
    deploy.add_parser(node)
    args = parser.parse_args(
        ["node", "deploy", "--port", "COM3", "--board", "esp32s3", "--dry-run", "--stage", str(tmp_path)]
    )
    assert args.func(args) == 0
    assert shlex.split(capsys.readouterr().out.splitlines()[-1])[:3] == ["mpremote", "connect", "COM3"]
    with pytest.raises(SystemExit):
        parser.parse_args(["node", "deploy", "--port", "COM3", "--board", "esp8266"])


def test_deploy_runs_standalone_without_edgeline_installed(tmp_path: Path) -> None:
    """PlatformIO's hook loads hil/deploy.py by path from its own Python: stdlib only."""
    r = subprocess.run(
        [
            sys.executable,
            "-S",
            "-I",
            str(Path(deploy.__file__)),
            "--port",
            "auto",
            "--board",
            "esp32",
            "--config",
            str(write_config(tmp_path)),
            "--dry-run",
            "--stage",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout.splitlines()[-1])[-1] == "reset"


def test_mpremote_really_copies_onto_a_micropython_filesystem_and_the_node_boots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The printed command, run by mpremote's own code, against the unix port in a folder.

    Only the serial line is simulated (tests/hil/micropython_board.py): mpremote's cp -r,
    hash checks and exec all run as Python source on MicroPython, as on a board.
    """
    mp_main = pytest.importorskip("mpremote.main", reason="mpremote is not installed: pip install mpremote")
    from micropython_board import FakeBoardTransport

    board = tmp_path / "board"
    (board / "edgeline_node").mkdir(parents=True)
    (board / "edgeline_node" / "stale.py").write_text("raise ImportError('stale')\n")  # from an older deploy
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.der").write_bytes(bytes(range(256)) * 3)
    config = write_config(
        tmp_path, broker={"host": "127.0.0.1", "port": 1, "tls": {"ca": "certs/ca.der"}}, data_dir="data"
    )
    rc, lines, err = dry_run(
        [
            "--port",
            "/dev/ttyUSB0",
            "--board",
            "esp32",
            "--config",
            str(config),
            "--stage",
            str(tmp_path / "s"),
        ],
        capsys,
    )
    assert rc == 0, err
    transports: list[FakeBoardTransport] = []

    def connect(dev: str, baudrate: int = 115200) -> FakeBoardTransport:
        assert dev == "/dev/ttyUSB0"
        transports.append(FakeBoardTransport(board))
        return transports[-1]

    monkeypatch.setattr("mpremote.commands.SerialTransport", connect)
    monkeypatch.setattr(sys, "argv", shlex.split(lines[-1]))
    assert mp_main.main() == 0
    (t,) = transports
    assert t.sources[0] == deploy.board_prep(["certs"])
    assert "machine.reset()" in t.sources[-1]  # the reset went last (a no-op on the unix port)

    on_board = sorted(p.relative_to(board).as_posix() for p in board.rglob("*") if p.is_file())
    expect = sorted(board_paths("esp32") | {"config.json", "certs/ca.der"})
    assert on_board == expect  # the stale module is gone
    for src, dest in deploy.board_files("esp32"):
        assert (board / dest).read_bytes() == src.read_bytes(), dest
    assert (board / "certs" / "ca.der").read_bytes() == bytes(range(256)) * 3

    # The board's filesystem boots the node: boot.py (no network module here), main.py,
    # config.json; "stop" on its command input ends it.
    env = dict(os.environ, MICROPYPATH=str(board))
    boot = subprocess.run(
        [micropython_binary(), "boot.py"], cwd=board, capture_output=True, text=True, timeout=30
    )
    assert boot.returncode == 0, boot.stdout + boot.stderr
    r = subprocess.run(
        [micropython_binary(), "main.py"],
        cwd=board,
        input="stop\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    events = [json.loads(line)["ev"] for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0, r.stdout + r.stderr
    assert events[0] == "boot" and events[-1] == "stopped", r.stdout
