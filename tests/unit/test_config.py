"""The configuration file: defaults documented, bad values named, per-VM entries."""
from __future__ import annotations

import pytest

from rescoin.cli import main
from rescoin.config import Config, ConfigError, default_text, load, parse


def test_default_file_is_complete_and_parses_to_the_defaults():
    text = default_text()
    assert parse(text) == Config()
    for key in ("uri", "period", "reserve_mib", "mem_floor_mib", "timeout", "listen", "weight", "min_memory_mib"):
        assert key in text
    assert "(MiB)" in text and "(s)" in text  # units shown


@pytest.mark.parametrize("text, words", [
    ("[daemon]\nperiod = -1", ["daemon.period", "-1", "1.0 .. 86400.0"]),
    ("[daemon]\npolicy = 'fair'", ["daemon.policy", "'fair'", "rescoin"]),
    ("[host]\nactuator = 'x'", ["host.actuator", "libvirt, cgroup"]),
    ("[host]\nreserve = 1", ["[host] unknown key 'reserve'", "reserve_mib"]),
    ("[guard]\nmem_step_frac = 1.5", ["mem_step_frac", "1.5"]),
    ("[vm.web]\nweight = 'heavy'", ["vm.web.weight", "must be a number"]),
    ("[vm.web]\nexclude = 1", ["vm.web.exclude", "true or false"]),
    ("[nonsense]\na = 1", ["unknown section [nonsense]"]),
    ("[daemon", ["not valid TOML"]),
    ("[agent]\ntcp = { web = 5 }", ["agent.tcp", "table of strings"]),
])
def test_bad_values_name_key_value_and_what_is_allowed(text, words):
    with pytest.raises(ConfigError) as e:
        parse(text, "rescoin.toml")
    msg = str(e.value)
    assert msg.startswith("rescoin.toml:")
    for w in words:
        assert w in msg, msg


def test_per_vm_entries_by_name_or_uuid():
    cfg = parse('[vm.web]\nweight = 3\n[vm."6695eb01-f6a4-8304-79aa-97f2502e193f"]\nexclude = true\n'
                "min_memory_mib = 512\n")
    assert cfg.for_vm("u1", "web").weight == 3.0
    by_uuid = cfg.for_vm("6695eb01-f6a4-8304-79aa-97f2502e193f", "other")
    assert by_uuid.exclude and by_uuid.min_memory_mib == 512.0
    assert cfg.for_vm("u2", "db").weight == 1.0


def test_missing_named_file_is_an_error_missing_default_is_defaults(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no such configuration file"):
        load(tmp_path / "nope.toml")
    import rescoin.config as c

    monkeypatch.setattr(c, "DEFAULT_PATH", tmp_path / "absent.toml")
    assert load(None) == Config()


def test_config_cli_default_and_check(tmp_path, capsys):
    assert main(["config", "default"]) == 0
    text = capsys.readouterr().out
    good = tmp_path / "good.toml"
    good.write_text(text)
    assert main(["config", "check", str(good)]) == 0
    assert "valid" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nperiod = 'often'\n")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "daemon.period" in err[0] and "'often'" in err[0]
