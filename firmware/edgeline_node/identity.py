# Device code. Who sent a message: a boot id that survives resets, and W3C trace/span ids.
import os

_BOOT_FILE = "boot_id"


def _join(d, name):
    return d + "/" + name if d else name


def ensure_dir(path):
    """Create `path` and its parents (os.makedirs is not on every port)."""
    if not path:
        return
    part = ""
    for piece in path.split("/"):
        part = part + "/" + piece if part or path.startswith("/") else piece
        if not piece:
            continue
        try:
            os.mkdir(part)
        except OSError:
            pass  # exists already (EEXIST); a real failure shows on the write below


def next_boot_id(data_dir):
    """Read, increment and persist the boot id; return the new one (1 on a fresh board).

    Written to a temporary file then renamed, so a power cut leaves the old or the new
    value, never a torn one.
    """
    ensure_dir(data_dir)
    path = _join(data_dir, _BOOT_FILE)
    boot = 0
    try:
        with open(path) as f:
            boot = int(f.read().strip() or "0")
    except (OSError, ValueError):
        boot = 0
    boot += 1
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(boot))
    os.rename(tmp, path)
    return boot


def trace_id():
    """A random 16-byte W3C trace id (never all zero, which W3C reserves as invalid)."""
    while True:
        t = os.urandom(16)
        if t != b"\x00" * 16:
            return t


def span_id():
    while True:
        s = os.urandom(8)
        if s != b"\x00" * 8:
            return s
