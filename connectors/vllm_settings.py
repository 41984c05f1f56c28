"""The vLLM connector's settings: the `kvstore_*` keys of `kv_connector_extra_config`, checked.

Both sides of the connector read them once, at construction (`Settings.from_vllm`); a key that is
misspelt or a value out of range fails engine start, naming it, rather than being ignored.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from kvstore.connectors.verify import VerifySettings

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# Every key the connector reads, with what it means; any other `kvstore_*` key is an error.
_SETTINGS = {
    "kvstore_address": "Ray address of the kvstore cluster, or kvstore://HOST:PORT of its HTTP service (an engine "
                       "outside Ray: no Ray in its processes; needs kvstore_token_file); empty: the Ray cluster this "
                       "process is in, else RAY_ADDRESS, else that of the Ray worker that spawned the engine; "
                       "'embedded': a kvstore private to this process (tests and demos only)",
    "kvstore_namespace": "tenant namespace salted into every key (default: the kvstore config's)",
    "kvstore_token_file": "file holding the credential: a tenant's token or the admin's (auth token)",
    "kvstore_model_id": "model id in the layout (default: the model path/name and revision)",
    "kvstore_load_mode": "async or sync (default: async when vLLM's engine core has its own process, "
                         "VLLM_ENABLE_V1_MULTIPROCESSING=1, vLLM's default; sync when it runs in the caller's)",
    "kvstore_save_mode": "sync (default for kv_producer) or async (default for kv_both)",
    "kvstore_lease_ttl_s": "TTL of the handoff lease (default: the kvstore config's lease_ttl_s)",
    "kvstore_verify_fraction": "verified restores: share of loads checked against the engine's own "
                               "computation instead of loaded (default 0.01; 0 with first_n 0: off)",
    "kvstore_verify_first_n": "verified restores: check every load while a source (node, medium) is within "
                              "its first n loads in this scheduler (default 8)",
    "kvstore_verify_rtol": "verified restores: relative tolerance (default by the KV dtype, see verify.py)",
    "kvstore_verify_atol": "verified restores: absolute tolerance (default 1e-6)",
    "kvstore_verify_seed": "verified restores: seed of the sampling coin (default: random)",
    "kvstore_test_delete_before_load": "test hook: a worker deletes the blocks from the store right "
                                       "before it loads them, so the load really fails",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `kv_connector_extra_config` asks of the connector (each key is described in _SETTINGS)."""

    address: str
    namespace: str | None
    token_file: str | None
    model_id: str | None
    load_async: bool
    save_async: bool
    lease_ttl_s: float | None
    test_delete_before_load: bool
    verify: VerifySettings = VerifySettings()

    @classmethod
    def from_vllm(cls, vllm_config: "VllmConfig") -> "Settings":
        """The settings of `vllm_config.kv_transfer_config`. Raises ValueError naming a key that is
        unknown or whose value is not accepted."""
        tc = vllm_config.kv_transfer_config
        extra = dict(tc.kv_connector_extra_config or {})
        unknown = sorted(k for k in extra if k.startswith("kvstore_") and k not in _SETTINGS)
        if unknown:
            raise ValueError(f"kv_connector_extra_config has unknown kvstore settings {unknown}; "
                             f"known: {sorted(_SETTINGS)}")
        address = str(extra.get("kvstore_address") or "")
        if address.startswith(("http://", "https://")):
            raise ValueError(
                f"kvstore_address={address!r} is an HTTP URL; give the kvstore cluster's Ray address (host:port "
                "of the Ray head's GCS, 'ray://host:10001' or 'auto'), or its HTTP service as kvstore://HOST:PORT "
                "(kvstores:// for TLS) with kvstore_token_file, for an engine outside Ray")

        def mode(key: str, default: str) -> bool:
            value = str(extra.get(key, default))
            if value not in ("sync", "async"):
                raise ValueError(f"{key}={value!r} must be 'sync' or 'async'")
            return value == "async"

        ttl = extra.get("kvstore_lease_ttl_s")
        return cls(
            address=address,
            namespace=extra.get("kvstore_namespace") or None,
            token_file=extra.get("kvstore_token_file") or None,
            model_id=extra.get("kvstore_model_id") or None,
            load_async=mode("kvstore_load_mode", _default_load_mode()),
            save_async=mode("kvstore_save_mode", "async" if tc.kv_role == "kv_both" else "sync"),
            lease_ttl_s=None if ttl is None else float(ttl),
            test_delete_before_load=bool(extra.get("kvstore_test_delete_before_load", False)),
            verify=_verify_settings(extra),
        )


def _default_load_mode() -> str:
    """async where vLLM's engine core has a process of its own (VLLM_ENABLE_V1_MULTIPROCESSING, on
    by default: servers, Ray Serve); sync where it runs in the caller's process (an in-process
    `LLM`). There, while a request waits for its KV, vLLM's step loop spins in the same process
    and starves the thread that loads it of the GIL: bench.vllm_ttft measured an async load of a
    3,000-token prompt slower than computing it (1.39 s against 1.24 s) and a sync one 10x faster."""
    from vllm import envs

    return "async" if envs.VLLM_ENABLE_V1_MULTIPROCESSING else "sync"


def _verify_settings(extra: dict) -> VerifySettings:
    defaults = VerifySettings()

    def num(key: str, kind, default):
        value = extra.get(key)
        if value is None or value == "":
            return default
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r} is not a number") from None

    try:
        return VerifySettings(fraction=num("kvstore_verify_fraction", float, defaults.fraction),
                              first_n=num("kvstore_verify_first_n", int, defaults.first_n),
                              rtol=num("kvstore_verify_rtol", float, defaults.rtol),
                              atol=num("kvstore_verify_atol", float, defaults.atol),
                              seed=num("kvstore_verify_seed", int, defaults.seed))
    except ValueError as e:
        raise ValueError(f"kv_connector_extra_config: kvstore_verify_*: {e}") from None
