# Device code. Runs first on a board. It only brings the network up from config.json's
# optional "wifi": {"ssid": ..., "password": ...}; the unix port has no `network` module and
# skips it. Everything else happens in main.py, where errors are reported.
try:
    import json
    import time

    import network

    with open("config.json") as f:
        _wifi = json.load(f).get("wifi")
    if _wifi:
        _sta = network.WLAN(network.STA_IF)
        _sta.active(True)
        if not _sta.isconnected():
            _sta.connect(_wifi["ssid"], _wifi["password"])
            for _ in range(100):  # up to 10 s; main.py retries the broker with backoff anyway
                if _sta.isconnected():
                    break
                time.sleep_ms(100)
except ImportError:
    pass  # no `network` module: unix port
except OSError as e:
    print("boot: no config.json or wifi failed:", e)
