"""Block checksums: computed once when a block is committed, verified wherever bytes cross.

A block's checksum is the xxh3-64 of its payload. It is taken once, at commit (fused with the
copy into the top tier, so the bytes are hashed while they are still in cache), then travels with
the block: in the store's entry, in the NVMe slot header, in every Flight batch. It is verified on
every NVMe read and cross-node transfer, and on local memory reads as `verify_reads` says:

- `always`: every block read from shared memory is hashed again (about 1.5x the cost of the
  copy alone on this project's machines; see docs/benchmarks.md);
- `sampled` (the default): a random `verify_sample_fraction` of blocks, which finds a scribbled
  arena within a few gets at a cost that does not show in the get path;
- `off`: never (NVMe and the wire are still always checked).

A block that fails is a miss, counted as corrupt, never data.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import xxhash

from kvstore.errors import ConfigError

VERIFY_MODES = ("off", "sampled", "always")
# Copy and hash in pieces that stay in L2, so the hash reads what the copy just brought in.
_CHUNK = 256 * 1024


def _u8(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.numpy()
    return np.frombuffer(t, dtype=np.uint8) if not isinstance(t, np.ndarray) else t


def checksum(data) -> int:
    """xxh3-64 of a CPU buffer (a uint8 tensor, an array, or anything with the buffer protocol)."""
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu":
            data = data.cpu()
        data = data.numpy()
    return xxhash.xxh3_64_intdigest(data)


def copy_with_checksum(dst: torch.Tensor, src, running: "xxhash.xxh3_64 | None" = None) -> int:
    """Copies src's bytes into the uint8 tensor dst (same length) and returns their checksum,
    hashing each piece right after it is copied. Off the CPU, a plain copy then a hash.
    `running`: a hash to go on with (a block arriving in parts, in order); the result is then
    the checksum of everything it has seen."""
    if dst.device.type != "cpu" or (isinstance(src, torch.Tensor) and src.device.type != "cpu"):
        dst.copy_(src if isinstance(src, torch.Tensor) else torch.from_numpy(_u8(src)))
        if running is None:
            return checksum(dst)
        running.update(dst.cpu().numpy())
        return running.intdigest()
    # Memoryview slices: the cheapest per-piece overhead Python has (this loop runs 8x per 2 MiB).
    d, s = memoryview(dst.numpy()).cast("B"), memoryview(_u8(src)).cast("B")
    if len(s) != len(d):
        raise ValueError(f"copy of {len(s)} bytes into {len(d)}")
    h = xxhash.xxh3_64() if running is None else running
    for start in range(0, len(d), _CHUNK):
        piece = d[start:start + _CHUNK]
        piece[:] = s[start:start + _CHUNK]
        h.update(piece)
    return h.intdigest()


class ReadVerifier:
    """Decides which local memory reads are hashed again (`verify_reads`, see the module doc)."""

    def __init__(self, mode: str = "sampled", fraction: float = 1 / 16) -> None:
        if mode not in VERIFY_MODES:
            raise ConfigError(f"verify_reads={mode!r} is not one of {', '.join(VERIFY_MODES)}")
        if not 0 <= fraction <= 1:
            raise ConfigError(f"verify_sample_fraction={fraction!r} must be within [0, 1]")
        self.mode = mode
        self.fraction = fraction
        self._random = random.Random()

    def wanted(self) -> bool:
        """Whether the next block read should be verified."""
        if self.mode == "always":
            return True
        return self.mode == "sampled" and self._random.random() < self.fraction
