"""Caller buffers -> per-block byte rows: the accepted forms alias memory; the rest is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.errors import PayloadError
from kvstore.layout import Layout
from kvstore.payload import block_rows

L = Layout("test/model@r1", 2, 2, 8, "float16", 16)
N = L.block_nbytes


def typed(n: int) -> torch.Tensor:
    return torch.randn((n, *L.block_shape)).to(torch.float16)


def test_typed_batch_rows_alias_the_buffer():
    t = typed(3)
    rows = block_rows(L, t, 3)
    assert len(rows) == 3
    assert all(r.dtype == torch.uint8 and tuple(r.shape) == (N,) for r in rows)
    assert bytes(rows[1].numpy()) == t[1].numpy().tobytes()
    rows[2][:] = 0  # writing a row writes the caller's tensor
    assert torch.count_nonzero(t[2]) == 0
    assert torch.count_nonzero(t[1]) > 0


def test_uint8_batch():
    t = torch.randint(0, 256, (2, N), dtype=torch.uint8)
    rows = block_rows(L, t, 2)
    assert rows[0].data_ptr() == t[0].data_ptr()
    assert torch.equal(rows[1], t[1])


def test_list_of_blocks_mixed_forms_and_numpy():
    a = typed(1)[0]
    b = torch.randint(0, 256, (N,), dtype=torch.uint8)
    c = np.random.default_rng(0).integers(0, 256, N, dtype=np.uint8)
    rows = block_rows(L, [a, b, c], 3)
    assert bytes(rows[0].numpy()) == a.numpy().tobytes()
    assert rows[1].data_ptr() == b.data_ptr()
    rows[2][0] = 7
    assert c[0] == 7  # numpy memory is shared, not copied
    assert block_rows(L, (a,), 1)[0].data_ptr() == a.data_ptr()


def test_numpy_batch():
    arr = np.zeros((2, *L.block_shape), dtype=np.float16)
    rows = block_rows(L, arr, 2)
    rows[0][:] = 0xFF
    assert np.isnan(arr[0]).all()


def test_zero_blocks():
    assert block_rows(L, torch.empty((0, *L.block_shape), dtype=torch.float16), 0) == []
    assert block_rows(L, torch.empty((0, N), dtype=torch.uint8), 0) == []
    assert block_rows(L, [], 0) == []


def test_mla_layout():
    mla = Layout("m", 2, 1, 8, "bfloat16", 16, mla=True)
    rows = block_rows(mla, torch.zeros((1, 2, 1, 16, 1, 8), dtype=torch.bfloat16), 1)
    assert rows[0].numel() == mla.block_nbytes


@pytest.mark.parametrize("make,shown", [
    (lambda: torch.zeros((2, 2, 2, 16, 2, 4), dtype=torch.float16), "(2, 2, 2, 16, 2, 4)"),  # shape
    (lambda: torch.zeros((2, *L.block_shape), dtype=torch.float32), "float32"),  # dtype
    (lambda: torch.zeros((2, *L.block_shape), dtype=torch.bfloat16), "bfloat16"),  # same size, wrong dtype
    (lambda: torch.zeros((3, *L.block_shape), dtype=torch.float16), "(3, 2, 2, 16, 2, 8)"),  # count
    (lambda: torch.zeros((2, N + 1), dtype=torch.uint8), f"(2, {N + 1})"),
    (lambda: torch.zeros((2 * N,), dtype=torch.uint8), f"({2 * N},)"),
    (lambda: torch.zeros((2, N // 2), dtype=torch.int16), "int16"),
])
def test_bad_batches_name_shape_and_dtype(make, shown):
    with pytest.raises(PayloadError) as info:
        block_rows(L, make(), 2)
    assert shown in str(info.value)
    assert isinstance(info.value, ValueError)


def test_non_contiguous_batch():
    base = torch.zeros((2, 2, 2, 16, 8, 2), dtype=torch.float16)
    t = base.transpose(-1, -2)  # right shape, wrong memory order
    assert tuple(t.shape) == (2, *L.block_shape)
    with pytest.raises(PayloadError, match="not contiguous") as info:
        block_rows(L, t, 2)
    assert str(t.stride()) in str(info.value)
    every_other = torch.zeros((4, N), dtype=torch.uint8)[::2]
    with pytest.raises(PayloadError, match="not contiguous"):
        block_rows(L, every_other, 2)


def test_non_contiguous_single_block():
    b = torch.zeros((2, 2, 16, 8, 2), dtype=torch.float16).transpose(-1, -2)
    with pytest.raises(PayloadError, match=r"blocks\[1\] with strides"):
        block_rows(L, [typed(1)[0], b], 2)


def test_list_errors_name_the_position():
    with pytest.raises(PayloadError, match="got 1 blocks for 2 keys"):
        block_rows(L, [typed(1)[0]], 2)
    with pytest.raises(PayloadError, match=r"out\[1\] must be a tensor, got bytes"):
        block_rows(L, [typed(1)[0], b"x" * N], 2, "out")
    with pytest.raises(PayloadError, match=r"blocks\[0\] has shape \(2048,\) and dtype float16"):
        block_rows(L, [torch.zeros(N, dtype=torch.float16)], 1)
    with pytest.raises(PayloadError, match="got dict"):
        block_rows(L, {"a": 1}, 1)  # type: ignore[arg-type]
