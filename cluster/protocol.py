"""The data plane's request format: msgpack maps, bounded before and while they are parsed.

A request (a Flight ticket for do_get, a descriptor command for do_put, a metadata-only message
on a session) is

    {"v": 1, "op": "get" | "put", "layout": {Layout fields}, "keys": [16-byte bin, ...],
     "parents": [16-byte bin | nil, ...],           # put only, optional
     "release": "hold id",                           # get only, optional: unpin it when streamed
     "by_layer": true}                               # get only, optional: layer-major order (below)

A session (do_exchange, opened with the command `SESSION_COMMAND`) carries one get after
another on one open stream: the client writes a request, the server answers with the blocks'
record batches and then a metadata-only message `{"sent": n}` (or `{"error": "..."}`, after
which the session goes on).

Block payloads travel as Arrow record batches of `BLOCK_SCHEMA`, one block (or one piece of a
large block: `offset` says where it goes, and a block's pieces come in order, one after
another) per row, each with the checksum its whole block was committed with
(kvstore.integrity): the receiver checks it once the block is whole. A get `by_layer` is answered
layer-major: layer 0 of every block, then layer 1 of every block, and so on (each block's pieces
still in order), so the reader can use layer i while later layers are on the way. Nothing
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
MAX_HOLD_ID_CHARS = 64
SESSION_COMMAND = msgpack.packb({"v": VERSION, "op": "session"})
BLOCK_SCHEMA = pa.schema([("key", pa.binary(KEY_BYTES)), ("checksum", pa.uint64()), ("offset", pa.uint64()),
                          ("data", pa.large_binary())])


class ProtocolError(KVStoreError, ValueError):
    """A data-plane request or batch is malformed, oversize, or names something it may not."""


@dataclasses.dataclass(frozen=True)
class Request:
    op: str
    layout: Layout
    keys: list[bytes]
    parents: list[bytes | None] | None = None
    release: str | None = None
    by_layer: bool = False


def encode_request(op: str, layout: Layout, keys: list[bytes], parents: list[bytes | None] | None = None,
                   release: str | None = None, by_layer: bool = False) -> bytes:
    body = {"v": VERSION, "op": op, "layout": layout.to_dict(), "keys": list(keys)}
    if parents is not None:
        body["parents"] = list(parents)
    if release is not None:
        body["release"] = release
    if by_layer:
        body["by_layer"] = True
    return msgpack.packb(body, use_bin_type=True)


def encode_reply(sent: int | None = None, error: str | None = None) -> bytes:
    """The end of one get on a session: how many blocks were sent, or why none were."""
    return msgpack.packb({"sent": sent} if error is None else {"error": error[:1000]})


def decode_reply(data: bytes) -> int:
    """Blocks sent, from a session's end-of-get message; ProtocolError if it is malformed or an
    error (whose text it carries)."""
    try:
        body = msgpack.unpackb(data, raw=False, max_str_len=1000, max_bin_len=0, max_array_len=0, max_map_len=1)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(f"reply is not valid msgpack: {e}") from None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        raise ProtocolError(body["error"])
    if not isinstance(body, dict) or not isinstance(body.get("sent"), int):
        raise ProtocolError(f"reply {body!r} is not {{'sent': n}}")
    return body["sent"]


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
    unknown = set(body) - {"v", "op", "layout", "keys", "parents", "release", "by_layer"}
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
        release = body.get("release")
        if release is not None and (op != "get" or not isinstance(release, str)
                                    or not 0 < len(release) <= MAX_HOLD_ID_CHARS):
            raise ProtocolError(f"release={release!r} must be a hold id of at most {MAX_HOLD_ID_CHARS} "
                                "characters, on a get")
        by_layer = body.get("by_layer", False)
        if by_layer is not False and (op != "get" or by_layer is not True):
            raise ProtocolError(f"by_layer={by_layer!r} must be true, on a get")
    except ProtocolError:
        raise
    except KVStoreError as e:
        raise ProtocolError(str(e)) from None
    if len(keys) * layout.block_nbytes > max_payload_bytes:
        raise ProtocolError(f"request for {len(keys)} blocks of {layout.block_nbytes} bytes exceeds "
                            f"max_request_bytes={max_payload_bytes}")
    return Request(op, layout, keys, parents, release, by_layer)
