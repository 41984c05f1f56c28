"""The data plane's request format: msgpack maps, bounded before and while they are parsed.

A request (a Flight ticket for do_get, a descriptor command for do_put) is

    {"v": 1, "op": "get" | "put", "layout": {Layout fields}, "keys": [16-byte bin, ...],
     "parents": [16-byte bin | nil, ...]}            # parents: put only, optional

Block payloads travel as Arrow record batches of `BLOCK_SCHEMA`, one block per row, each with
the checksum it was committed with (kvstore.integrity): the receiver checks it. Nothing
here is pickle: a peer can only send maps, lists, strings, integers and bytes, and every length
is capped (msgpack refuses oversize arrays and strings before allocating them).
"""
from __future__ import annotations

import dataclasses

import msgpack
import pyarrow as pa

from kvstore.errors import KVStoreError
from kvstore.keys import KEY_BYTES, check_key, check_keys
from kvstore.layout import Layout

VERSION = 1
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # of the encoded request itself, not the payload it asks for
MAX_KEYS = 65536
BLOCK_SCHEMA = pa.schema([("key", pa.binary(KEY_BYTES)), ("checksum", pa.uint64()), ("data", pa.large_binary())])


class ProtocolError(KVStoreError, ValueError):
    """A data-plane request or batch is malformed, oversize, or names something it may not."""


@dataclasses.dataclass(frozen=True)
class Request:
    op: str
    layout: Layout
    keys: list[bytes]
    parents: list[bytes | None] | None = None


def encode_request(op: str, layout: Layout, keys: list[bytes], parents: list[bytes | None] | None = None) -> bytes:
    body = {"v": VERSION, "op": op, "layout": layout.to_dict(), "keys": list(keys)}
    if parents is not None:
        body["parents"] = list(parents)
    return msgpack.packb(body, use_bin_type=True)


def decode_request(data: bytes, op: str, max_payload_bytes: int) -> Request:
    """Parses and checks a request for `op`; raises ProtocolError naming what is wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"request must be bytes, got {type(data).__name__}")
    if len(data) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request of {len(data)} bytes exceeds {MAX_REQUEST_BYTES}")
    try:
        body = msgpack.unpackb(
            bytes(data), raw=False, strict_map_key=True, max_bin_len=KEY_BYTES * 4, max_str_len=4096,
            max_array_len=MAX_KEYS, max_map_len=64, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(f"request is not valid msgpack: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"request must be a map, got {type(body).__name__}")
    if body.get("v") != VERSION:
        raise ProtocolError(f"request version {body.get('v')!r} is not {VERSION}")
    if body.get("op") != op:
        raise ProtocolError(f"request op {body.get('op')!r} is not {op!r}")
    unknown = set(body) - {"v", "op", "layout", "keys", "parents"}
    if unknown:
        raise ProtocolError(f"request has unknown fields {sorted(unknown)!r}")
    try:
        layout = Layout.from_dict(body.get("layout"))
        keys = body.get("keys")
        if not isinstance(keys, list):
            raise ProtocolError(f"keys must be a list, got {type(keys).__name__}")
        keys = check_keys(keys)
        parents = body.get("parents")
        if parents is not None:
            if not isinstance(parents, list) or len(parents) != len(keys):
                raise ProtocolError(f"parents must be a list of {len(keys)} entries")
            parents = [None if p is None else check_key(p, i) for i, p in enumerate(parents)]
    except ProtocolError:
        raise
    except KVStoreError as e:
        raise ProtocolError(str(e)) from None
    if len(keys) * layout.block_nbytes > max_payload_bytes:
        raise ProtocolError(f"request for {len(keys)} blocks of {layout.block_nbytes} bytes exceeds "
                            f"max_request_bytes={max_payload_bytes}")
    return Request(op, layout, keys, parents)
