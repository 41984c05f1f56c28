"""Where a pull's blocks land (cluster/pulled.py): whole blocks and blocks in pieces, checked
against the checksum they travelled with, copied into the caller's rows and, when the pull
caches, into reserved arena slots that are reported only for whole, undamaged, unfenced blocks."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from kvstore.cluster.pulled import INLINE_COPY_BELOW, PulledBlocks
from kvstore.integrity import checksum


@pytest.fixture
def copier():
    with ThreadPoolExecutor(1) as pool:
        yield pool


@pytest.mark.parametrize("nbytes", [64 * 1024, 2 * INLINE_COPY_BELOW], ids=["inline", "on-a-worker"])
@pytest.mark.parametrize("piece", [None, 16 * 1024], ids=["whole", "in-pieces"])
def test_blocks_land_checked_in_rows_and_reserved_slots(copier, nbytes, piece):
    keys = [os.urandom(16) for _ in range(4)]
    data = {k: np.frombuffer(os.urandom(nbytes), dtype=np.uint8) for k in keys}
    rows = torch.zeros((4, nbytes), dtype=torch.uint8)
    arena = np.zeros((6, nbytes), dtype=np.uint8)
    generations = np.zeros(6, dtype=np.uint64)
    reserved = {keys[0]: (2, 0), keys[1]: (3, 0), keys[2]: (4, 0)}
    sink = PulledBlocks(dict(zip(keys, rows)), nbytes, copier, arena, generations, reserved)
    damaged = data[keys[1]].copy()
    damaged[nbytes - 1] ^= 0xFF  # in the last piece: the block's earlier pieces looked fine
    generations[4] = 1  # keys[2]'s slot was fenced after it was reserved
    step = piece or nbytes
    for key in keys:
        payload = damaged if key == keys[1] else data[key]
        for offset in range(0, nbytes, step):
            sink(key, memoryview(payload[offset:offset + step]), checksum(data[key]), offset)
    sink.wait()
    assert sink.damaged == {keys[1]}
    assert sink.cached == {keys[0]: checksum(data[keys[0]])}  # not the damaged one, not the fenced one
    assert np.array_equal(arena[2], data[keys[0]])
    for i in (0, 2, 3):
        assert np.array_equal(rows[i].numpy(), data[keys[i]])


def test_without_a_cache_only_rows_are_written(copier):
    key = os.urandom(16)
    block = np.frombuffer(os.urandom(4096), dtype=np.uint8)
    rows = torch.zeros((1, 4096), dtype=torch.uint8)
    sink = PulledBlocks({key: rows[0]}, 4096, copier)
    sink(key, memoryview(block), checksum(block), 0)
    sink.wait()
    assert not sink.damaged and not sink.cached and np.array_equal(rows[0].numpy(), block)
