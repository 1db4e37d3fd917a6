# Device code. Entry point on a board (run after boot.py) and under the unix port:
#   micropython main.py [config.json]
import sys

from edgeline_node.config import ConfigError
from edgeline_node.node import main

try:
    main(sys.argv[1] if len(sys.argv) > 1 else "config.json")
except ConfigError as e:
    print("edgeline node: bad config:", e)
    sys.exit(2)
