"""Shared pytest setup: the test helpers live beside this file."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
pytest_plugins = ["brokers"]
