"""Where a pull's blocks land (cluster/pulled.py): whole blocks and blocks in pieces, checked
against the checksum they travelled with, copied into the caller's rows and, when the pull
caches, into reserved arena slots that are reported only for whole, undamaged, unfenced blocks."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from kvstore.cluster.pulled import INLINE_COPY_BELOW, Landing, PulledBlocks
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


def test_a_landing_gives_a_layer_once_every_block_has_it_or_the_get_is_over():
    import threading
    keys = [os.urandom(16) for _ in range(3)]
    landing = Landing(keys, layer_nbytes=100, num_layers=4)
    landing.landed(keys[0], 400)  # a local block: whole at once
    landing.landed(keys[1], 150)  # a piece ending inside layer 1
    assert not landing.wait_layer(0, timeout_s=0.01)  # keys[2] has nothing yet
    landing.landed(keys[2], 100)
    assert landing.wait_layer(0, timeout_s=0.01) and not landing.wait_layer(1, timeout_s=0.01)
    landing.landed(keys[1], 200)
    assert not landing.wait_layer(1, timeout_s=0.01)  # keys[2] still lacks layer 1
    waiter = threading.Thread(target=lambda: results.append(landing.wait_layer(3)))
    results: list[bool] = []
    waiter.start()
    landing.end()  # the get is over with keys[1] and keys[2] short: the waiter is let go, told so
    waiter.join(5)
    assert results == [False]


def test_pieces_that_land_are_reported_to_the_landing(copier):
    nbytes = 2 * INLINE_COPY_BELOW
    keys = [os.urandom(16) for _ in range(2)]
    data = {k: np.frombuffer(os.urandom(nbytes), dtype=np.uint8) for k in keys}
    rows = torch.zeros((2, nbytes), dtype=torch.uint8)
    landing = Landing(keys, layer_nbytes=nbytes // 4, num_layers=4)
    sink = PulledBlocks(dict(zip(keys, rows)), nbytes, copier, landing=landing)
    for offset in range(0, nbytes // 2, nbytes // 4):  # layers 0 and 1 of both, layer-major
        for key in keys:
            sink(key, memoryview(data[key][offset:offset + nbytes // 4]), checksum(data[key]), offset)
    sink.wait()
    assert landing.wait_layer(1, timeout_s=5) and not landing.wait_layer(2, timeout_s=0.01)
    assert all(bytes(rows[i, :nbytes // 2].numpy()) == data[k][:nbytes // 2].tobytes() for i, k in enumerate(keys))
