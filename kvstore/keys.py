"""Block keys: a 16-byte chained hash over token ids, salted by namespace and layout.

    root = H("kvstore/v1", namespace, layout.id)
    k_0  = H_keyed(root,    tokens[0:T]       [+ extra_0])
    k_i  = H_keyed(k_{i-1}, tokens[i*T:(i+1)*T] [+ extra_i])

`extra_i` is everything besides token ids that changes block i's KV: request-wide parts (a LoRA
adapter, a request's cache salt, a model revision) and parts of that block alone (a multimodal
input's content hash and position where it overlaps the block). The rule is that two inputs that
could produce different KV never share a key, so whoever builds keys must pass every such part;
`cache_extra` encodes them canonically. Without extras a block hashes exactly its tokens (4T
bytes); with them the hashed data is longer, so the two can never collide.

H is BLAKE2b with a 16-byte digest, keyed with the previous key: a key names its whole prefix,
is the same in every process and host (never Python's `hash()`), and a tenant cannot craft a
prompt whose key collides with another's. Only full blocks get keys; a partial tail is left to
the engine to recompute. Token ids are hashed as little-endian uint32.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping, Sequence

import msgpack
import numpy as np

from kvstore.errors import InvalidKeyError, InvalidTokensError
from kvstore.layout import Layout

KEY_BYTES = 16
_MAX_TOKEN = 2**32


def root_key(layout: Layout, namespace: str = "default") -> bytes:
    """The chain's seed for one namespace and layout: two namespaces never share a key."""
    if not isinstance(namespace, str) or not namespace or len(namespace) > 256:
        raise InvalidKeyError(f"namespace={namespace!r} must be a non-empty string of at most 256 characters")
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"kvstore.root.v1")
    h.update(namespace.encode())
    h.update(b"\0")
    h.update(layout.id)
    return h.digest()


def token_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as a contiguous little-endian uint32 array; rejects anything else by value."""
    try:
        arr = np.asarray(tokens)
    except (ValueError, TypeError) as e:  # ragged nesting, say
        raise InvalidTokensError(f"token ids {tokens!r:.80} are not a 1-D sequence of integers: {e}") from None
    if arr.ndim != 1:
        raise InvalidTokensError(f"token ids must be 1-D, got shape {arr.shape}: {tokens!r:.80}")
    if arr.size == 0:
        return np.empty(0, dtype="<u4")
    if not np.issubdtype(arr.dtype, np.integer):
        # Name the first offending value (a float, a bool, a string, or an int too large for
        # NumPy's integer types, which makes an object array).
        for value in (tokens if isinstance(tokens, (list, tuple)) else arr.tolist()):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise InvalidTokensError(f"token id {value!r} is not an integer (token ids have dtype {arr.dtype})")
            if not 0 <= value < _MAX_TOKEN:
                raise InvalidTokensError(f"token id {value} is outside [0, 2**32)")
        arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= _MAX_TOKEN:
        bad = lo if lo < 0 else hi
        raise InvalidTokensError(f"token id {bad} is outside [0, 2**32)")
    return np.ascontiguousarray(arr, dtype="<u4")


_EXTRA_TAG = b"\x00kvstore.extra.v1"


def cache_extra(**parts: Any) -> bytes:
    """A canonical encoding of the non-token inputs of a block's KV (None parts are left out).

    Values may be str, bytes, int, float, bool or lists/tuples of those; the same parts always
    give the same bytes, whatever order they were named in.
    """
    present = {k: v for k, v in sorted(parts.items()) if v is not None}
    if not present:
        return b""
    try:
        return msgpack.packb(present, use_bin_type=True)
    except (TypeError, ValueError) as e:
        raise InvalidKeyError(f"cache extra {present!r:.120} cannot be encoded: {e}") from None


def block_keys(
    tokens: Sequence[int] | np.ndarray,
    layout: Layout,
    namespace: str = "default",
    parent: bytes | None = None,
    *,
    extra: bytes = b"",
    block_extra: Mapping[int, bytes] | None = None,
) -> list[bytes]:
    """Keys of every full block of `tokens`.

    With `parent`, the tokens continue the chain after that key (its namespace and layout are
    already folded into it); otherwise the chain starts at `root_key(layout, namespace)`.
    `extra` (request-wide) and `block_extra[i]` (block i of this call only) are folded into the
    blocks' hashes: build them with `cache_extra`.
    """
    prev = root_key(layout, namespace) if parent is None else check_key(parent)
    data = memoryview(token_array(tokens)).cast("B")
    step = 4 * layout.block_tokens
    blake2b = hashlib.blake2b
    keys = []
    if not extra and not block_extra:
        for start in range(0, len(data) - step + 1, step):
            prev = blake2b(data[start:start + step], digest_size=KEY_BYTES, key=prev).digest()
            keys.append(prev)
        return keys
    if not isinstance(extra, bytes) or (block_extra is not None and not isinstance(block_extra, Mapping)):
        raise InvalidKeyError(f"extra must be bytes and block_extra a mapping of block index to bytes, got "
                              f"{type(extra).__name__} and {type(block_extra).__name__}")
    block_extra = block_extra or {}
    for i, start in enumerate(range(0, len(data) - step + 1, step)):
        mine = block_extra.get(i, b"")
        if not isinstance(mine, bytes):
            raise InvalidKeyError(f"block_extra[{i}] must be bytes, got {type(mine).__name__}")
        h = blake2b(data[start:start + step], digest_size=KEY_BYTES, key=prev)
        if extra or mine:  # a block with no extras keys as its tokens alone: text before an image shares
            # Length-prefixed, so (extra, block extra) pairs cannot run into one another.
            h.update(_EXTRA_TAG + len(extra).to_bytes(4, "little") + extra + len(mine).to_bytes(4, "little") + mine)
        prev = h.digest()
        keys.append(prev)
    return keys


def check_key(key: object, index: int | None = None) -> bytes:
    """Returns the key as bytes, or raises InvalidKeyError naming it (and its position)."""
    where = "" if index is None else f" at position {index}"
    if isinstance(key, (bytearray, memoryview)):
        key = bytes(key)
    if not isinstance(key, bytes):
        raise InvalidKeyError(f"block key{where} must be bytes, got {type(key).__name__}: {key!r:.80}")
    if len(key) != KEY_BYTES:
        raise InvalidKeyError(f"block key{where} must be {KEY_BYTES} bytes, got {len(key)}: {key.hex()[:64]}")
    return key


def check_keys(keys: Iterable[object]) -> list[bytes]:
    return [check_key(k, i) for i, k in enumerate(keys)]


def check_parents(parents: Sequence[object] | None, n: int) -> list[bytes | None]:
    """Each of n blocks' parent key (None: a chain's first block), checked; all None if not given."""
    if parents is None:
        return [None] * n
    if len(parents) != n:
        raise InvalidKeyError(f"parents has {len(parents)} entries for {n} keys")
    return [None if p is None else check_key(p, i) for i, p in enumerate(parents)]


def chain_parents(keys: Sequence[bytes], first_parent: bytes | None = None) -> list[bytes | None]:
    """Parents of a chain of keys: the first has `first_parent`, each other the key before it."""
    return [first_parent, *keys[:-1]] if keys else []
