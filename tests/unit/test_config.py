"""The configuration file: defaults documented, bad values named, per-VM entries."""
from __future__ import annotations

import pytest

from rescoin.cli import main
from rescoin.ops.config import Config, ConfigError, default_text, load, parse


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
    import rescoin.ops.config as c

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


# -- NaN, infinity and absurd sizes (issue 8, item 14) --------------------------------------------
def _number_options():
    """Every numeric option of every section, as (section, key)."""
    from dataclasses import fields

    from rescoin.ops.config import SECTIONS, VMConfig

    out = [(name, f.name) for name, cls in SECTIONS.items() for f in fields(cls)
           if type(f.default) in (int, float)]
    return out + [("vm.web", f.name) for f in fields(VMConfig) if type(f.default) in (int, float)]


@pytest.mark.parametrize("section, key", _number_options())
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_infinity_fail_every_number_option(section, key, value):
    with pytest.raises(ConfigError) as e:
        parse(f"[{section}]\n{key} = {value}\n", "rescoin.toml")
    msg = str(e.value)
    assert msg.startswith("rescoin.toml:") and f"{section}.{key} = {value}" in msg and len(msg.splitlines()) == 1


def test_the_number_options_cover_the_ones_the_issue_names():
    options = set(_number_options())
    assert {("daemon", "period"), ("host", "reserve_mib"), ("vm.web", "weight"), ("guard", "mem_floor_mib"),
            ("agent", "timeout")} <= options


@pytest.mark.parametrize("text, words", [
    ("[host]\nreserve_mib = 1e12", ["host.reserve_mib", "must be in"]),
    ("[host]\nmemory_mib = 1e12", ["host.memory_mib", "must be in"]),
    ("[host]\nreserve_cores = 1e9", ["host.reserve_cores"]),
    ("[host]\nnet_kibs = 1e300", ["host.net_kibs"]),
    ("[vm.web]\nmax_memory_mib = 1e15", ["vm.web.max_memory_mib"]),
    ("[vm.web]\nmin_memory_mib = 4096\nmax_memory_mib = 1024",
     ["[vm.web]", "min_memory_mib = 4096 is above max_memory_mib = 1024"]),
    ("[metrics]\nlisten = '127.0.0.1:99999'", ["metrics.listen", "1 .. 65535"]),
    ("[metrics]\nlisten = '127.0.0.1:0'", ["metrics.listen", "1 .. 65535"]),
    ("[metrics]\nlisten = '9848'", ["metrics.listen", "HOST:PORT"]),
    ("[metrics]\nlisten = '::1:9848'", ["metrics.listen", "[V6]:PORT"]),
    ("[metrics]\nlisten = 'local host:9848'", ["metrics.listen"]),
    ("[agent.tcp]\nweb = '10.0.0.5'", ["agent.tcp.web", "HOST:PORT"]),
    ("[agent.tcp]\nweb = '10.0.0.5:http'", ["agent.tcp.web", "1 .. 65535"]),
])
def test_absurd_sizes_bad_addresses_and_crossed_memory_bounds_are_refused(text, words):
    with pytest.raises(ConfigError) as e:
        parse(text, "rescoin.toml")
    msg = str(e.value)
    assert msg.startswith("rescoin.toml:") and msg.count("metrics.listen") <= 1, msg
    for w in words:
        assert w in msg, msg


def test_sensible_sizes_and_addresses_are_accepted():
    cfg = parse("[host]\nreserve_mib = 65536\n[vm.web]\nmin_memory_mib = 1024\nmax_memory_mib = 1024\n"
                "[vm.db]\nmin_memory_mib = 2048\n[metrics]\nlisten = '[::1]:9848'\n"
                "[agent.tcp]\nweb = '192.168.1.5:7000'\ndb = '[fe80::1]:7000'\n")
    assert cfg.host.reserve_mib == 65536 and cfg.for_vm("u", "db").max_memory_mib == 0  # 0 = no maximum


# -- `config check` checks what `run` needs ------------------------------------------------------
def _check(tmp_path, capsys, text: str) -> tuple[int, list[str]]:
    path = tmp_path / "rescoin.toml"
    path.write_text(text)
    code = main(["config", "check", str(path)])
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()]


def _key(tmp_path, body: str, mode: int = 0o600):
    key = tmp_path / "agent.key"
    key.write_text(body)
    key.chmod(mode)
    return key


@pytest.mark.parametrize("make, words", [
    (lambda tmp: tmp / "missing.key", ["agent.key_file", "No such file"]),
    (lambda tmp: _key(tmp, ""), ["agent.key_file", "fewer than 16 bytes"]),
    (lambda tmp: _key(tmp, "k" * 32, 0o644), ["agent.key_file", "chmod 600"]),
    (lambda tmp: tmp, ["agent.key_file", "not a regular file"]),
])
def test_config_check_refuses_an_agent_key_file_run_could_not_use(tmp_path, capsys, make, words):
    code, err = _check(tmp_path, capsys, f'[agent]\nkey_file = "{make(tmp_path)}"\n')
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], err


def test_config_check_accepts_a_good_key_file(tmp_path, capsys):
    code, err = _check(tmp_path, capsys, f'[agent]\nkey_file = "{_key(tmp_path, "k" * 32)}"\n')
    assert code == 0 and err == []


@pytest.mark.parametrize("body, words", [
    (None, ["daemon.model", "model file not found"]),
    ("[cpu\n", ["daemon.model", "not valid TOML"]),
    (b"\xff\xfe\x00", ["daemon.model"]),
    ("[cpu]\nalpha = 'x'\n", ["daemon.model"]),
])
def test_config_check_refuses_a_model_file_that_does_not_load(tmp_path, capsys, body, words):
    model = tmp_path / "model.toml"
    if isinstance(body, bytes):
        model.write_bytes(body)
    elif body is not None:
        model.write_text(body)
    code, err = _check(tmp_path, capsys, f'[daemon]\nmodel = "{model}"\n')
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], err


def test_config_check_loads_the_shipped_model(tmp_path, capsys):
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[2] / "models" / "default.toml"
    code, err = _check(tmp_path, capsys, f'[daemon]\nmodel = "{shipped}"\n')
    assert code == 0 and err == []


def test_a_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "rescoin.toml"
    path.write_bytes(b"[daemon]\nuri = '\xff'\n")
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rescoin.toml:2: not UTF-8 text" in err[0] and "Traceback" not in err[0]


def test_vm_entries_matching_no_vm_by_name_or_uuid():
    from rescoin.ops.config import unmatched_vm_entries

    cfg = parse('[vm.web]\n[vm."6695eb01-f6a4-8304-79aa-97f2502e193f"]\n[vm.wbe]\n[vm.db]\n')
    vms = [("6695eb01-f6a4-8304-79aa-97f2502e193f", "test"), ("u2", "web"), ("u3", "db")]
    assert unmatched_vm_entries(cfg, vms) == ["wbe"]
    assert unmatched_vm_entries(cfg, []) == sorted(cfg.vm)


def test_changed_keys_name_options_and_vm_entries():
    from rescoin.ops.config import changed_keys

    old = parse('[daemon]\nperiod = 60\n[vm.web]\nweight = 2\n')
    new = parse('[daemon]\nperiod = 30\ndry_run = true\n[host]\nreserve_mib = 10\n[vm.web]\nweight = 3\n[vm.db]\n')
    assert changed_keys(old, new) == ["daemon.period", "daemon.dry_run", "host.reserve_mib", 'vm."db"', 'vm."web"']
    assert changed_keys(new, new) == []


# -- argparse number types -------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e400"])
def test_argparse_numbers_refuse_nan_and_infinity(text):
    import argparse

    from rescoin.cli.argtypes import number

    for parse_number in (number(float), number(float, 0), number(float, 0, strict=True)):
        with pytest.raises(argparse.ArgumentTypeError, match="finite"):
            parse_number(text)
    assert number(float, 0)("2.5") == 2.5


@pytest.mark.parametrize("argv", [["simulate", "--trace", "x", "--overcommit", "nan"],
                                  ["run", "--period", "nan"], ["run", "--speed", "inf"],
                                  ["run", "--host-memory", "inf"], ["demo", "--seconds", "nan"]])
def test_commands_refuse_nan_and_infinity_in_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "finite" in err[0]


# -- [balance] (issue 12 item 4) -------------------------------------------------------------------
def test_balance_section_parses_and_gives_rules():
    from rescoin.ops.balance_config import rules_from

    cfg = parse('[balance]\nhosts = ["qemu+ssh://h1/system"]\nhold = 5\naffinity = [["web", "cache"]]\n'
                'anti_affinity = [["db1", "db2"]]\npin = { db1 = ["h1"] }\nignore = ["x"]\nmaintenance = ["h3"]\n'
                'reserve_mib = { default = 1024, h1 = 2048 }\n')
    assert cfg.balance.hold == 5 and cfg.balance.margin == 0.1 and cfg.balance.hosts == ("qemu+ssh://h1/system",)
    rules = rules_from(cfg.balance, ("h1", "h2"))
    assert rules.affinity == (frozenset({"web", "cache"}),) and rules.pins == {"db1": frozenset({"h1"})}
    assert rules.reserve_mib == {"h1": 2048.0, "h2": 1024.0} and rules.maintenance == {"h3"}
    assert "# [balance]" in default_text() and "anti_affinity" in default_text()


@pytest.mark.parametrize("text, words", [
    ("[balance]\nanti_affinity = [['a']]", ["balance.anti_affinity[0]: a group needs at least two VMs"]),
    ("[balance]\naffinity = [['a', 'b']]\nanti_affinity = [['a', 'b']]", ["balance.anti_affinity[0]", "a and b"]),
    ("[balance]\npin = { db = [] }", ["balance.pin.db", "no hosts"]),
    ("[balance]\nreserve_mib = { h1 = -1 }", ["balance.reserve_mib.h1", "at least 0"]),
    ("[balance]\nholdd = 3", ["[balance] unknown key 'holdd'"]),
    ("[balance]\nhold = 1.5", ["balance.hold", "whole number"]),
    ("[balance]\ninterval = nan", ["balance.interval", "finite"]),
])
def test_bad_balance_values_name_the_key(text, words):
    with pytest.raises(ConfigError) as e:
        parse(text, "rescoin.toml")
    msg = str(e.value)
    assert msg.startswith("rescoin.toml:") and len(msg.splitlines()) == 1
    for w in words:
        assert w in msg, msg


def test_config_check_validates_the_balance_section(tmp_path, capsys):
    path = tmp_path / "rescoin.toml"
    path.write_text("[balance]\nanti_affinity = [['a']]\n")
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "balance.anti_affinity[0]" in err[0]
