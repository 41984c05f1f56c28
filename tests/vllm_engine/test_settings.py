"""The connector's version pin and its settings (kv_connector_extra_config)."""
from __future__ import annotations

import re
import types

import pytest

from vllm_support import needs_vllm

pytestmark = [pytest.mark.vllm, needs_vllm]


def vllm_config(role: str = "kv_both", **extra):
    tc = types.SimpleNamespace(kv_role=role, kv_connector_extra_config=extra)
    return types.SimpleNamespace(kv_transfer_config=tc)


def test_version_pin():
    from kvstore.connectors import vllm as kvc

    for supported in ("0.29.0", "0.29.1", "0.32.0", "0.32.3", "0.33.0"):
        kvc._check_vllm_version(supported)
    for other in ("0.34.0", "0.30.0", "0.3.2", "0.320.0", "0.290.0", "1.0.0"):
        with pytest.raises(ImportError, match=re.escape(f"tested with vLLM 0.29.x, 0.32.x, 0.33.x, but vLLM {other} "
                                                        "is installed")):
            kvc._check_vllm_version(other)


def test_the_version_escape_hatch_is_not_mistaken_for_a_setting(monkeypatch):
    """The version check's error tells users to set KVSTORE_VLLM_SKIP_VERSION_CHECK=1; kvstore's
    config, which refuses KVSTORE_* variables that name no setting, must let it be."""
    from kvstore.config import load_config

    monkeypatch.setenv("KVSTORE_VLLM_SKIP_VERSION_CHECK", "1")
    load_config(None)


def test_settings_defaults_and_names(monkeypatch):
    from kvstore.connectors.vllm_settings import Settings

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # vLLM's default: the engine core in its own process
    s = Settings.from_vllm(vllm_config("kv_producer", kvstore_address="10.0.0.5:6379",
                                       kvstore_token_file="/etc/kvstore/secret/token"))
    assert (s.address, s.token_file, s.load_async, s.save_async) == ("10.0.0.5:6379", "/etc/kvstore/secret/token",
                                                                     True, False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: loads in the step, not a starved thread
    assert not Settings.from_vllm(vllm_config("kv_consumer")).load_async
    assert Settings.from_vllm(vllm_config(kvstore_load_mode="async")).load_async
    assert Settings.from_vllm(vllm_config("kv_both")).save_async  # a prefix cache saves in the background
    assert not Settings.from_vllm(vllm_config(kvstore_load_mode="sync")).load_async


def test_bad_settings_are_named():
    from kvstore.connectors.vllm_settings import Settings

    with pytest.raises(ValueError, match="kvstore_adress"):
        Settings.from_vllm(vllm_config(kvstore_adress="x"))
    with pytest.raises(ValueError, match="HTTP URL"):
        Settings.from_vllm(vllm_config(kvstore_address="http://kvstore:8470"))
    with pytest.raises(ValueError, match="kvstore_load_mode='later'"):
        Settings.from_vllm(vllm_config(kvstore_load_mode="later"))


def test_verify_settings():
    from kvstore.connectors.verify import VerifySettings
    from kvstore.connectors.vllm_settings import Settings

    assert Settings.from_vllm(vllm_config()).verify == VerifySettings()  # verify.py's defaults
    s = Settings.from_vllm(vllm_config(kvstore_verify_fraction="0.5", kvstore_verify_first_n=2,
                                       kvstore_verify_rtol=0.1, kvstore_verify_atol=0, kvstore_verify_seed=3))
    assert s.verify == VerifySettings(fraction=0.5, first_n=2, rtol=0.1, atol=0.0, seed=3)
    with pytest.raises(ValueError, match="fraction=2.0 must be in"):
        Settings.from_vllm(vllm_config(kvstore_verify_fraction=2))
    with pytest.raises(ValueError, match="kvstore_verify_first_n='many' is not a number"):
        Settings.from_vllm(vllm_config(kvstore_verify_first_n="many"))


def test_the_address_joined_is_never_a_silent_private_kvstore(monkeypatch, tmp_path):
    import subprocess
    import sys

    from kvstore.connectors import vllm_client as vc
    from kvstore.errors import KVStoreError

    for name in ("RAY_ADDRESS", "RAY_RAYLET_PID"):
        monkeypatch.delenv(name, raising=False)
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a process vLLM spawned
    assert vc.join_address("10.0.0.5:6379") == "10.0.0.5:6379"
    assert vc.join_address("kvstore://10.0.0.5:8470") == "kvstore://10.0.0.5:8470"  # the remote client's
    assert vc.join_address("embedded") is None  # asked for: a private one
    with pytest.raises(KVStoreError, match="no kvstore cluster to join.*kvstore_address"):
        vc.join_address("")
    # Spawned by a Ray worker: its raylet's command line names the cluster.
    raylet = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--gcs-address=10.0.0.9:6379"])
    try:
        from kvtest_support import wait_for

        wait_for(lambda: b"--gcs-address" in open(f"/proc/{raylet.pid}/cmdline", "rb").read(), 10,
                 "the stand-in raylet to exec")
        monkeypatch.setenv("RAY_RAYLET_PID", str(raylet.pid))
        assert vc.join_address("") == "10.0.0.9:6379"
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")  # wins over the spawner's
        assert vc.join_address("") == "10.0.0.7:6379"
    finally:
        raylet.kill()
        raylet.wait()


def test_an_engine_with_no_kvstore_to_join_fails_start_saying_what_to_set():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_RAYLET_PID")}
    code = ("import kvstore.connectors.vllm\n"  # as an engine loads it: nothing it imports starts Ray
            "from kvstore.connectors.vllm_client import shared_client\n"
            "from kvstore.connectors.vllm_settings import Settings\n"
            "s = Settings('', None, None, None, True, False, None, False)\n"
            "try:\n    shared_client(s)\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
            "import ray\nprint('ray initialized', ray.is_initialized())\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "KVStoreError" in out and "kvstore_address" in out and "RAY_ADDRESS" in out, out
    assert "ray initialized False" in out, out  # and no private Ray was started instead


def test_sleep_mode_is_declared_unsupported():
    """vLLM 0.33 asks before it lets an engine sleep (its KV cache is freed and mapped anew on
    wake-up): the connector's worker holds views of the cache, so it says no."""
    from kvstore.connectors.vllm import KVStoreConnector

    assert KVStoreConnector.supports_sleep_mode(None) is False


def test_the_kv_events_followed_are_those_vllm_binds():
    """vLLM binds its KV-event socket for wildcard, [::] and ipc:// endpoints and connects it to any
    other (a router's subscriber binds there): the connector can only follow a bound one."""
    from kvstore.connectors.vllm_residency import events_endpoint

    def config(endpoint, enabled=True, publisher="zmq"):
        return types.SimpleNamespace(
            kv_events_config=types.SimpleNamespace(enable_kv_cache_events=enabled, publisher=publisher,
                                                   endpoint=endpoint),
            parallel_config=types.SimpleNamespace(data_parallel_rank=0))

    assert events_endpoint(config("tcp://*:5557")) == "tcp://127.0.0.1:5557"
    assert events_endpoint(config("tcp://[::]:5557")) == "tcp://[::1]:5557"
    assert events_endpoint(config("ipc:///tmp/kv-events")) == "ipc:///tmp/kv-events"
    assert events_endpoint(config("tcp://10.0.0.7:5557")) is None  # vLLM connects there: a router's
    assert events_endpoint(config("tcp://*:5557", enabled=False)) is None
    assert events_endpoint(config("tcp://*:5557", publisher="null")) is None
    assert events_endpoint(types.SimpleNamespace(kv_events_config=None)) is None
