"""The HBM tier: an arena in GPU memory, with its own CUDA stream for copies.

Copies in and out are queued on the tier's stream (after the caller's current stream, so a
block is not read before the kernel that wrote it has finished) and waited for once per batch,
never per block. Without CUDA the same code runs on a CPU tensor, so the store's logic around
this tier is tested everywhere.
"""
from __future__ import annotations

import torch

from kvstore.tiers.base import MemoryTier, memory_geometry, size_classes
from kvstore.tiers.geometry import SizeClasses, SlotRows


class HBMTier(MemoryTier):
    name = "hbm"
    medium = "GPU"

    def __init__(self, classes: SizeClasses | int, capacity_bytes: int,
                 device: str | torch.device | None = None) -> None:
        classes = size_classes(classes)
        geometry = memory_geometry(classes, capacity_bytes, "hbm_tier_bytes")
        super().__init__(classes, geometry)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        flat = torch.zeros(geometry.data_bytes, dtype=torch.uint8, device=self.device)
        self.arena = flat.view(self.num_slots, self.slot_stride) if geometry.single else SlotRows(flat, geometry)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def write_many(self, items, checksums=None):
        return self._on_stream(super().write_many, items, checksums)

    def read_many(self, items, verify=None):
        return self._on_stream(super().read_many, items, verify)

    def _on_stream(self, copy, items, arg):
        """Runs a batch of copies on the tier's stream, after the work queued on the caller's."""
        if self._stream is None:
            return copy(items, arg)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            return copy(items, arg)

    def _sync(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def close(self) -> None:
        self.arena = None

    def stats(self) -> dict:
        return {**super().stats(), "device": str(self.device)}
