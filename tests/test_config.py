"""Configuration: defaults < YAML file < KVSTORE_* environment < overrides; bad input named."""
from __future__ import annotations

import dataclasses

import pytest

from kvstore.config import ENV_PREFIX, FIELDS, Config, load_config, markdown_table, parse_size
from kvstore.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "kvstore.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,expected", [
    ("4GiB", 4 * 1024**3),
    ("4gib", 4 * 1024**3),
    ("4Gi", 4 * 1024**3),
    (" 512 MiB ", 512 * 1024**2),
    ("2G", 2 * 1000**3),
    ("2GB", 2 * 1000**3),
    ("1.5KiB", 1536),
    ("1048576", 1048576),
    ("10b", 10),
    ("1TiB", 1024**4),
    ("3k", 3000),
    (0, 0),
    (4096, 4096),
    (8.0, 8),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["4GiBs", "-1", "abc", "", "4 G iB", "1e3", True, -5, 1.5, None, [1]])
def test_parse_size_rejects_naming_the_value(bad):
    with pytest.raises(ConfigError) as info:
        parse_size(bad, "host_tier_bytes")
    assert f"host_tier_bytes={bad!r}" in str(info.value)


def test_defaults():
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.namespace == "default"
    assert cfg.slot_bytes == 0 and cfg.block_sizes == "auto"  # size classes derived from the layouts seen
    assert cfg.size_classes().auto and not cfg.size_classes().single
    assert cfg.host_tier_bytes == 1024**3
    assert cfg.eviction_policy == "lru"
    assert cfg.nvme_direct_io is True


def test_yaml_then_env_then_overrides(tmp_path):
    path = write(tmp_path, "host_tier_bytes: 4GiB\nnamespace: from-file\nio_threads: 8\n"
                           "prefix_aware_eviction: false\nlease_ttl_s: 12.5\n")
    cfg = load_config(path, env={})
    assert cfg.host_tier_bytes == 4 * 1024**3
    assert cfg.namespace == "from-file"
    assert cfg.io_threads == 8
    assert cfg.prefix_aware_eviction is False
    assert cfg.lease_ttl_s == 12.5

    env = {"KVSTORE_HOST_TIER_BYTES": "512MiB", "KVSTORE_IO_THREADS": "3", "KVSTORE_PREFIX_AWARE_EVICTION": "yes",
           "UNRELATED": "x", "KVSTORE_CONFIG": str(path)}
    cfg = load_config(path, env=env)
    assert cfg.host_tier_bytes == 512 * 1024**2  # env wins over the file
    assert cfg.io_threads == 3
    assert cfg.prefix_aware_eviction is True
    assert cfg.namespace == "from-file"  # the file wins over the default

    cfg = load_config(path, env=env, io_threads=5, namespace="override")
    assert (cfg.io_threads, cfg.namespace, cfg.host_tier_bytes) == (5, "override", 512 * 1024**2)


def test_env_from_os_environ(monkeypatch):
    for var in list(__import__("os").environ):
        if var.startswith(ENV_PREFIX):
            monkeypatch.delenv(var)
    monkeypatch.setenv("KVSTORE_SLOT_BYTES", "64KiB")
    monkeypatch.setenv("KVSTORE_EVICTION_POLICY", "s3fifo")
    cfg = load_config()
    assert cfg.slot_bytes == 64 * 1024
    assert cfg.eviction_policy == "s3fifo"


@pytest.mark.parametrize("value,expected", [("true", True), ("1", True), ("On", True), (" yes ", True),
                                            ("false", False), ("0", False), ("off", False), ("NO", False)])
def test_bool_spellings(value, expected):
    assert load_config(env={"KVSTORE_NVME_DIRECT_IO": value}).nvme_direct_io is expected


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path, "host_tier_byte: 4GiB\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "'host_tier_byte'" in str(info.value) and str(path) in str(info.value)


def test_unknown_env_var():
    with pytest.raises(ConfigError, match="KVSTORE_HOST_TIER_BYTE "):
        load_config(env={"KVSTORE_HOST_TIER_BYTE": "1GiB"})


def test_unknown_override():
    with pytest.raises(ConfigError, match="'bogus'"):
        load_config(env={}, bogus=1)


@pytest.mark.parametrize("name,value,shown", [
    ("host_tier_bytes", "lots", "host_tier_bytes='lots'"),
    ("slot_bytes", "-4KiB", "slot_bytes='-4KiB'"),
    ("nvme_direct_io", "maybe", "nvme_direct_io='maybe'"),
    ("io_threads", "four", "io_threads='four'"),
    ("event_batch_ms", "1.5", "event_batch_ms='1.5'"),
    ("lease_ttl_s", "soon", "lease_ttl_s='soon'"),
    ("eviction_policy", "fifo", "eviction_policy='fifo'"),
    ("log_level", "debug", "log_level='debug'"),
])
def test_bad_env_values_name_the_value(name, value, shown):
    with pytest.raises(ConfigError) as info:
        load_config(env={f"{ENV_PREFIX}{name.upper()}": value})
    assert shown in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("line,shown", [
    ("namespace: 123", "namespace=123"),
    ("io_threads: 1.5", "io_threads=1.5"),
    ("io_threads: true", "io_threads=True"),
    ("nvme_direct_io: 3", "nvme_direct_io=3"),
    ("host_tier_bytes: [1, 2]", "host_tier_bytes=[1, 2]"),
    ("io_threads: 0", "io_threads=0"),
    ("http_port: 0", "http_port=0"),
    ("flight_port: 70000", "flight_port=70000"),
    ("lease_ttl_s: 0", "lease_ttl_s=0.0"),
    ("event_batch_ms: -1", "event_batch_ms=-1"),
    ("block_sizes: 0", "block_sizes=0"),
    ("block_sizes: 64KiB, lots", "block_sizes='lots'"),
    ("block_sizes: 64KiB,,2MiB", "block_sizes='64KiB,,2MiB'"),
    ("block_sizes: [64KiB, 2MiB]", "block_sizes=['64KiB', '2MiB']"),
    ("chunk_bytes: 8KiB", "chunk_bytes=8192"),
    ("min_slot_bytes: 0", "min_slot_bytes=0"),
])
def test_bad_file_values_name_the_value(tmp_path, line, shown):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, line + "\n"), env={})
    assert shown in str(info.value)


def test_block_sizes_spellings_and_slot_bytes_as_one_class(tmp_path):
    cfg = load_config(write(tmp_path, "block_sizes: 64KiB, 2MiB,5MiB\n"), env={})
    classes = cfg.size_classes()
    assert classes.declared == (64 * 1024, 2 * 1024**2, 5 * 1024**2) and not classes.auto
    assert load_config(env={"KVSTORE_BLOCK_SIZES": "2MiB, auto"}).size_classes().auto
    one = load_config(env={}, slot_bytes="4KiB").size_classes()  # the setting before size classes
    assert one.single and one.declared == (4096,) and one.slot_nbytes == 4096


def test_slot_bytes_with_block_sizes_is_refused_naming_both():
    with pytest.raises(ConfigError) as info:
        load_config(env={}, slot_bytes="2MiB", block_sizes="64KiB,2MiB")
    assert "slot_bytes=2097152" in str(info.value) and "block_sizes='64KiB,2MiB'" in str(info.value)


def test_nvme_size_needs_a_path():
    with pytest.raises(ConfigError, match="nvme_path"):
        load_config(env={}, nvme_tier_bytes="1GiB")
    cfg = load_config(env={}, nvme_tier_bytes="1GiB", nvme_path="/tmp/x")
    assert cfg.nvme_tier_bytes == 1024**3


def test_bad_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing, env={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"), env={})
    with pytest.raises(ConfigError, match="must hold a mapping, not list"):
        load_config(write(tmp_path, "- 1\n- 2\n"), env={})
    assert load_config(write(tmp_path, ""), env={}) == Config()  # empty file: defaults


def test_token_file_wins(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    assert load_config(env={}, auth_token="inline").token() == "inline"
    assert load_config(env={}, auth_token="inline", auth_token_file=str(secret)).token() == "s3cret"
    with pytest.raises(ConfigError, match="missing-token"):
        load_config(env={}, auth_token_file=str(tmp_path / "missing-token")).token()


def test_to_dict_and_markdown_cover_every_setting():
    cfg = load_config(env={})
    assert set(cfg.to_dict()) == set(FIELDS)
    table = markdown_table()
    for name in FIELDS:
        assert f"`{name}`" in table and f"`{ENV_PREFIX}{name.upper()}`" in table
    assert "`'1GiB'`" in table  # sizes shown with units
    assert dataclasses.is_dataclass(cfg)


def test_docs_list_every_setting_as_the_code_does():
    from pathlib import Path

    from kvstore.config import markdown_table

    docs = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert markdown_table() in docs, "regenerate docs/configuration.md with `kvstore config --markdown`"
