from pathlib import Path

import pytest
from edgeline.host.gateway_config import GatewayConfigError, load, parse


def test_full_config(tmp_path: Path) -> None:
    p = tmp_path / "gw.toml"
    p.write_text(
        '[gateway]\nid = "gw-1"\nsite = "plant-a"\nstate_dir = "/tmp/x"\n'
        '[mqtt]\nhost = "10.0.0.5"\nport = 8883\n'
        "[opcua]\nport = 4841\n"
        '[uplink]\nkind = "kafka"\nbootstrap_servers = "k1:9092"\nmax_age_s = 3600\n'
    )
    cfg = load(p)
    assert (cfg.gateway_id, cfg.site, cfg.state_dir) == ("gw-1", "plant-a", "/tmp/x")
    assert (cfg.broker_host, cfg.broker_port, cfg.opcua_port) == ("10.0.0.5", 8883, 4841)
    assert cfg.uplink.kind == "kafka" and cfg.uplink.max_age_s == 3600


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"mqtt": {"prot": 1}}, "mqtt.prot"),
        ({"mqtt": {"port": "1883"}}, "mqtt.port"),
        ({"mqtt": {"port": 0}}, "mqtt.port"),
        ({"opcua": {"port": True}}, "opcua.port"),
        ({"gateway": {"site": "a/b"}}, "gateway.site"),
        ({"gateway": {"id": ""}}, "gateway.id"),
        ({"uplink": {"kind": "amqp"}}, "uplink.kind"),
        ({"uplink": {"kind": "kafka"}}, "uplink.bootstrap_servers"),
        ({"extra": {}}, "[extra]"),
    ],
)
def test_errors_name_the_key(raw: dict[str, dict[str, object]], named: str) -> None:
    with pytest.raises(
        GatewayConfigError, match=named.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")
    ):
        parse(raw)


def test_unreadable_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt\nport = 1")
    with pytest.raises(GatewayConfigError, match="not valid TOML"):
        load(bad)


def test_opcua_security_is_the_default_and_none_is_explicit(tmp_path: Path) -> None:
    secure = parse({}, base_dir=tmp_path)
    assert secure.opcua_security is not None  # production default: Sign&Encrypt
    assert parse({"opcua": {"security": "none"}}).opcua_security is None
    with pytest.raises(GatewayConfigError, match="security"):
        parse({"opcua": {"security": "maybe"}})


def test_alarm_hysteresis_checked() -> None:
    assert (
        parse({"opcua": {"security": "none"}, "alarms": {"raise_threshold": 4}}).opcua_alarms.raise_threshold
        == 4
    )
    with pytest.raises(GatewayConfigError, match=r"\[alarms\]"):
        parse({"alarms": {"raise_threshold": 1.0, "clear_threshold": 2.0}})
