"""Typed errors. Every message names the value that was wrong, so a caller can act on it.

All errors derive from KVStoreError; the ones caused by a caller's bad input also derive from
ValueError, so generic input handling keeps working.
"""
from __future__ import annotations


class KVStoreError(Exception):
    """Base of every error kvstore raises on purpose."""


class ConfigError(KVStoreError, ValueError):
    """A setting is missing, misspelt or out of range."""


class InvalidLayoutError(KVStoreError, ValueError):
    """A layout field is out of range, or a layout does not fit the store's slots."""


class LayoutMismatchError(KVStoreError, ValueError):
    """A block was asked for, or offered, under a layout other than the one it was stored with."""


class InvalidKeyError(KVStoreError, ValueError):
    """A block key is not 16 bytes, or not bytes at all."""


class InvalidTokensError(KVStoreError, ValueError):
    """Token ids are not a 1-D sequence of non-negative integers below 2**32."""


class PayloadError(KVStoreError, ValueError):
    """A payload buffer has the wrong shape, dtype, size, device or memory order."""


class CapacityError(KVStoreError):
    """A tier has no free slot and nothing it may evict (everything pinned or being written)."""


class BlockStateError(KVStoreError):
    """An operation is illegal in the block's current lifecycle state (see kvstore.block)."""


class TierIOError(KVStoreError):
    """A storage medium failed: a file cannot be created, preallocated, read or written."""


class CorruptBlockError(TierIOError):
    """A stored block failed its checksum; it is dropped, never served."""


class TransferError(KVStoreError):
    """A block could not be moved between nodes (peer gone, refused, or timed out)."""


class AuthError(KVStoreError):
    """A request carried no token, or the wrong one."""


class LeaseError(KVStoreError):
    """A lease is unknown, expired, or already released."""
