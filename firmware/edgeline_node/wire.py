# Device code, also imported by the gateway: the wire contract's numbers in one place.
# docs/wire-format.md is the prose for these; change both together, and only by adding.
from .compat import const

SCHEMA_VERSION = const(1)
TOPIC_ROOT = "edgeline/v1"

# Message kinds (key K_KIND) and the topic suffix each is published under.
KIND_EVT = const(1)
KIND_TEL = const(2)
KIND_BIRTH = const(3)
KIND_DEATH = const(4)
KIND_STATE = const(5)
KIND_DEAD_LETTER = const(6)
# Southbound (docs/southbound.md) and the uplink record (docs/uplink.md).
KIND_CMD_MODEL = const(7)  # gateway -> node, cmd/model
KIND_CMD_CONFIG = const(8)  # gateway -> node, cmd/config
KIND_TIME_REQ = const(9)  # node -> gateway, cmd/time/req
KIND_TIME_RESP = const(10)  # gateway -> node, cmd/time/resp
KIND_CMD_ACK = const(11)  # node -> gateway, cmd/ack
KIND_UPLINK = const(12)  # gateway -> upstream, not on the node's broker topics
KIND_NAMES = {1: "evt", 2: "tel", 3: "birth", 4: "death", 5: "state", 6: "dead", 7: "cmd/model",
              8: "cmd/config", 9: "cmd/time/req", 10: "cmd/time/resp", 11: "cmd/ack"}

# Keys common to every message.
K_V = const(0)  # schema version, uint
K_KIND = const(1)  # message kind, uint
K_NODE = const(2)  # node id, text
K_BOOT = const(3)  # boot id, uint, persisted and incremented on every boot
K_SEQ = const(4)  # sequence number, uint, monotonic per boot (evt and tel share it)
K_TRACE = const(5)  # W3C trace id, 16 bytes
K_SPAN = const(6)  # W3C span id, 8 bytes
K_T_WALL = const(7)  # wall clock of the sample that completed the window, us since epoch; 0 = unsynced
K_T_MONO = const(8)  # node monotonic clock of that sample, us (wraps at 2**30)

# evt: one scored window.
K_FEATURES = const(10)  # map sensor -> array of feature values (order: birth's feature names)
K_SCORES = const(11)  # map sensor -> anomaly score (|z| of the control chart)
K_ANOMALY = const(12)  # bool: the window is anomalous
K_CAUSES = const(13)  # array of sensor names out of control
K_DETECTOR = const(14)  # text: the detector that decided ("spc")

# birth (retained): who the node is and where it sits.
K_FW = const(20)  # firmware version, text
K_MODEL_SHA = const(21)  # sha256 of the model file, 32 bytes, or null
K_SENSORS = const(22)  # array of [name, unit, [feature names]]
K_SITE = const(23)
K_LINE = const(24)
K_MACHINE = const(25)
K_DROPS = const(26)  # map priority -> records dropped since first boot
K_WINDOW = const(27)  # [sample rate Hz, samples per window]

# tel: node health summary.
K_UPTIME_S = const(30)
K_HEAP_FREE = const(31)
K_QUEUE_DEPTH = const(32)

# gateway state (retained, last will "offline") and dead letters.
K_ONLINE = const(40)
K_GATEWAY = const(41)
K_TOPIC = const(42)
K_REASON = const(43)
K_PAYLOAD = const(44)  # first bytes of the refused payload

# southbound commands (docs/southbound.md)
K_CMD_ID = const(50)  # uint < 2**32, one push (all its chunks and its ack share it)
K_VERSION = const(51)  # uint < 2**32, model or config version; older than the running one: refused
K_SHA256 = const(52)  # bstr 32, sha256 of the whole model file / of the config bytes
K_TAG = const(53)  # bstr 32, HMAC-SHA256(device key, sha256 || u32be(version) || node id)
K_INDEX = const(54)  # uint, chunk index from 0
K_TOTAL = const(55)  # uint >= 1, number of chunks
K_DATA = const(56)  # bstr, this chunk's bytes (model), or the whole config as CBOR (config)
K_SIZE = const(57)  # uint, the whole model's size in bytes
K_T1 = const(60)  # uint, node ticks_us when it sent the time request (echoed by the gateway)
K_T2 = const(61)  # gateway wall clock us since the epoch when the request arrived
K_T3 = const(62)  # gateway wall clock us since the epoch when the answer left
K_STATUS = const(63)  # tstr, ack status: "ok" or a refusal code

# uplink records (docs/uplink.md)
K_MACHINE_KEY = const(70)  # tstr "site/line/machine"
K_GATEWAY_ID = const(71)  # tstr
K_T_GATEWAY = const(72)  # uint, gateway receive time, us since the epoch

GATEWAY_NODE = "_gateway"  # reserved node id under which the gateway publishes


def topic(site, node, kind):
    return TOPIC_ROOT + "/" + site + "/" + node + "/" + KIND_NAMES[kind]


def valid_name(s):
    """Node, site, line, machine and sensor names: 1-32 of [A-Za-z0-9_-], not starting with '_'.

    They become MQTT topic levels and OPC-UA browse names, so no '/', '+', '#' or spaces.
    """
    if not isinstance(s, str) or not 0 < len(s) <= 32 or s[0] == "_":
        return False
    for c in s:
        if not ("a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9" or c == "_" or c == "-"):
            return False
    return True
