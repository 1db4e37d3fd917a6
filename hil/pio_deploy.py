"""PlatformIO hook (platformio.ini: ``extra_scripts = pre:hil/pio_deploy.py``).

Host code, never copied to a board. PlatformIO builds C firmware; this project's node is
MicroPython, so the hook takes over before any compiler runs:

- ``pio run -t upload -e <board> [--upload-port PORT]`` deploys the node with
  hil/deploy.py (mpremote: boot.py, main.py, config.json, edgeline_node/), the same as
  ``edgeline node deploy --board <board>``;
- ``pio run -e <board>`` (a build) validates the config and stages the files, compiling
  them to .mpy when asked, under ``.pio/build/<board>/node``: a dry run, no board needed;
- any other target (monitor, erase, ...) is PlatformIO's own.

Per-environment options: ``custom_node_config`` (the config to install; empty keeps the
board's) and ``custom_mpy`` (yes: cross-compile to .mpy for the board's CPU). With no
``--upload-port``, mpremote picks the first USB serial device (``auto``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def load_deploy(project_dir: Path) -> ModuleType:
    """hil/deploy.py by path: PlatformIO runs this hook in its own Python, without edgeline."""
    path = project_dir / "hil" / "deploy.py"
    spec = importlib.util.spec_from_file_location("edgeline_hil_deploy", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def deploy_argv(env: Any, targets: list[str]) -> list[str] | None:
    """hil/deploy.py arguments for this PlatformIO run, or None to leave the targets to PlatformIO."""
    board = env.subst("$PIOENV")
    project = Path(env.subst("$PROJECT_DIR"))
    argv = ["--board", board]
    config = env.GetProjectOption("custom_node_config", "").strip()
    if config:
        argv += ["--config", str(project / config)]
    if env.GetProjectOption("custom_mpy", "no").strip().lower() in ("yes", "true", "1"):
        argv.append("--mpy")
    if "upload" in targets:
        return [*argv, "--port", env.subst("$UPLOAD_PORT") or "auto"]
    if not targets or "buildprog" in targets:
        stage = Path(env.subst("$BUILD_DIR")) / "node"
        return [*argv, "--port", env.subst("$UPLOAD_PORT") or "auto", "--dry-run", "--stage", str(stage)]
    return None


def hook(env: Any, targets: list[str]) -> None:
    argv = deploy_argv(env, targets)
    if argv is None:
        return
    deploy = load_deploy(Path(env.subst("$PROJECT_DIR")))
    env.Exit(deploy.main(argv))


try:
    Import("env")  # type: ignore[name-defined]
except NameError:  # imported by a test or a tool, not run by PlatformIO
    pass
else:
    from SCons.Script import COMMAND_LINE_TARGETS

    hook(globals()["env"], list(COMMAND_LINE_TARGETS))
