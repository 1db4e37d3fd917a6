# Device code. A bounded in-RAM queue of encoded messages, oldest first.
# The seam the flash-backed store-and-forward queue fills in: append / peek / pop / depth /
# drops. When full, the oldest message goes and is counted, never silently.


class RamQueue:
    def __init__(self, max_messages):
        self._items = [None] * max_messages  # type: list  # ring of (kind, payload); allocated once
        self._head = 0
        self._len = 0
        self.drops = 0

    @property
    def depth(self):
        return self._len

    def append(self, kind, payload):
        cap = len(self._items)
        if self._len == cap:
            self._items[self._head] = None
            self._head = (self._head + 1) % cap
            self._len -= 1
            self.drops += 1
        self._items[(self._head + self._len) % cap] = (kind, payload)
        self._len += 1

    def peek(self):
        return self._items[self._head] if self._len else None

    def pop(self):
        if self._len:
            self._items[self._head] = None
            self._head = (self._head + 1) % len(self._items)
            self._len -= 1
