"""platformio.ini and its upload hook (hil/pio_deploy.py).

PlatformIO cannot download its platforms here, so what CI can check is the project
configuration as PlatformIO itself parses it (`pio project config`, which works offline) and
the hook, run the way PlatformIO runs an extra script: with Import("env") and the command
line targets, against a stand-in for PlatformIO's SCons environment.
"""

from __future__ import annotations

import inspect
import json
import runpy
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from edgeline.hil import deploy

REPO = Path(__file__).resolve().parents[1]
HOOK = REPO / "hil" / "pio_deploy.py"
ENVS = {"esp32": "esp32dev", "esp32s3": "esp32-s3-devkitc-1", "pico_w": "rpipicow"}


def pio() -> str:
    exe = shutil.which("pio") or str(Path(sys.executable).parent / "pio")
    if not Path(exe).exists():
        pytest.fail("PlatformIO is not installed: pip install platformio (it belongs in the dev extra)")
    return exe


def project_config() -> dict[str, dict[str, Any]]:
    r = subprocess.run(
        [pio(), "project", "config", "--json-output"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return {section: dict(items) for section, items in json.loads(r.stdout)}


def test_platformio_has_one_environment_per_board_each_deploying_through_the_hook() -> None:
    cfg = project_config()
    envs = {name.removeprefix("env:"): opts for name, opts in cfg.items() if name.startswith("env:")}
    assert {name: opts["board"] for name, opts in envs.items()} == ENVS
    assert set(envs) == set(deploy.BOARDS)  # the hook passes the environment name as --board
    for name, opts in envs.items():
        assert opts["extra_scripts"] == ["pre:hil/pio_deploy.py"], name
        assert opts["upload_protocol"] == "custom", name
        assert opts["platform"], name
    assert envs["esp32"]["platform"] == envs["esp32s3"]["platform"] == "espressif32"
    assert cfg["platformio"]["default_envs"] == ["esp32"]
    assert HOOK.is_file()
    # The hook lives where nothing is deployed to a board.
    assert not any(dest.startswith("hil/") for b in deploy.BOARDS for _, dest in deploy.board_files(b))


class FakeSConsEnv:
    """What the hook uses of PlatformIO's SCons construction environment."""

    def __init__(self, pioenv: str, build_dir: Path, options: dict[str, str], upload_port: str = "") -> None:
        self.vars = {
            "PIOENV": pioenv,
            "PROJECT_DIR": str(REPO),
            "BUILD_DIR": str(build_dir),
            "UPLOAD_PORT": upload_port,
        }
        self.options = options
        self.exit_code: int | None = None

    def subst(self, s: str) -> str:
        return self.vars.get(s.removeprefix("$"), "")

    def GetProjectOption(self, name: str, default: str = "") -> str:
        return self.options.get(name, default)

    def Exit(self, code: int) -> None:
        self.exit_code = code


def run_hook(env: FakeSConsEnv, targets: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    script = types.ModuleType("SCons.Script")
    script.COMMAND_LINE_TARGETS = targets  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "SCons", types.ModuleType("SCons"))
    monkeypatch.setitem(sys.modules, "SCons.Script", script)

    def scons_import(name: str) -> None:  # SCons's Import() puts the exported name in the caller's globals
        caller = inspect.currentframe().f_back  # type: ignore[union-attr]
        caller.f_globals[name] = env  # type: ignore[union-attr]

    runpy.run_path(str(HOOK), init_globals={"Import": scons_import})


def test_a_build_stages_and_compiles_without_a_board(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = FakeSConsEnv(
        "pico_w",
        tmp_path / ".pio" / "build" / "pico_w",
        {"custom_mpy": "yes", "custom_node_config": "firmware/config.example.json"},
    )
    run_hook(env, [], monkeypatch)
    assert env.exit_code == 0, capsys.readouterr().err
    stage = tmp_path / ".pio" / "build" / "pico_w" / "node"
    assert (stage / "edgeline_node" / "hal_rp2040.mpy").is_file()
    assert not (stage / "edgeline_node" / "hal_esp32.mpy").exists()
    lines = capsys.readouterr().out.splitlines()
    assert any("-march=armv6m" in line for line in lines)
    mpremote = shlex.split(lines[-1])
    assert mpremote[:3] == ["mpremote", "connect", "auto"]
    assert mpremote[-6:] == [
        "fs",
        "cp",
        str(REPO / "firmware" / "config.example.json"),
        ":config.json",
        "+",
        "reset",
    ]


def test_upload_runs_deploy_with_the_environment_and_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = runpy.run_path(str(HOOK))  # as a tool imports it: no SCons, nothing runs
    env = FakeSConsEnv(
        "esp32s3",
        tmp_path,
        {"custom_mpy": "no", "custom_node_config": "node/config.json"},
        upload_port="/dev/ttyUSB1",
    )
    assert hook["deploy_argv"](env, ["upload"]) == [
        "--board",
        "esp32s3",
        "--config",
        str(REPO / "node" / "config.json"),
        "--port",
        "/dev/ttyUSB1",
    ]
    env = FakeSConsEnv("esp32", tmp_path, {"custom_mpy": "yes"})
    assert hook["deploy_argv"](env, ["upload"]) == ["--board", "esp32", "--mpy", "--port", "auto"]
    assert hook["deploy_argv"](env, ["monitor"]) is None  # PlatformIO's own targets stay its own
    called: list[list[str]] = []
    fake_deploy = types.SimpleNamespace(main=lambda argv: called.append(argv) or 0)
    monkeypatch.setitem(hook["hook"].__globals__, "load_deploy", lambda project: fake_deploy)
    hook["hook"](env, ["upload"])
    assert called == [["--board", "esp32", "--mpy", "--port", "auto"]]
    assert env.exit_code == 0
