"""Caller buffers -> per-block byte rows, checked against the layout.

The store accepts a batch of blocks as one tensor `[n, *layout.block_shape]` of the layout's
dtype, as one uint8 tensor `[n, layout.block_nbytes]`, or as a sequence of n tensors each holding
one block (so an engine can hand over scattered blocks without packing them). NumPy arrays are
taken as tensors without a copy. Every row must be contiguous: the store copies bytes, and a
strided view would silently reorder them.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from kvstore.errors import PayloadError
from kvstore.layout import Layout

Blocks = Union[torch.Tensor, np.ndarray, Sequence[Union[torch.Tensor, np.ndarray]]]


def block_rows(layout: Layout, blocks: Blocks, n: int, what: str = "blocks") -> list[torch.Tensor]:
    """n uint8 tensors of `layout.block_nbytes` each, aliasing the caller's memory."""
    if isinstance(blocks, np.ndarray):
        blocks = torch.from_numpy(blocks)
    if isinstance(blocks, torch.Tensor):
        return _rows_of_batch(layout, blocks, n, what)
    if not isinstance(blocks, (list, tuple)):
        raise PayloadError(f"{what} must be a tensor or a list of tensors, got {type(blocks).__name__}")
    if len(blocks) != n:
        raise PayloadError(f"{what}: got {len(blocks)} blocks for {n} keys")
    return [_one_row(layout, b, f"{what}[{i}]") for i, b in enumerate(blocks)]


def _rows_of_batch(layout: Layout, t: torch.Tensor, n: int, what: str) -> list[torch.Tensor]:
    typed_shape = (n, *layout.block_shape)
    if t.dtype == torch.uint8 and tuple(t.shape) == (n, layout.block_nbytes):
        rows = t
    elif t.dtype == layout.torch_dtype and tuple(t.shape) == typed_shape:
        rows = t if n == 0 else None
    else:
        raise PayloadError(
            f"{what} has shape {tuple(t.shape)} and dtype {_name(t.dtype)}; layout {layout.model_id} needs "
            f"{typed_shape} of {layout.dtype} or {(n, layout.block_nbytes)} of uint8")
    if not t.is_contiguous():
        raise PayloadError(f"{what} with shape {tuple(t.shape)} and strides {t.stride()} is not contiguous")
    if rows is None:
        rows = t.view(torch.uint8).view(n, layout.block_nbytes)
    return list(rows.unbind(0)) if n else []


def _one_row(layout: Layout, b, what: str) -> torch.Tensor:
    if isinstance(b, np.ndarray):
        b = torch.from_numpy(b)
    if not isinstance(b, torch.Tensor):
        raise PayloadError(f"{what} must be a tensor, got {type(b).__name__}")
    ok = ((b.dtype == layout.torch_dtype and tuple(b.shape) == layout.block_shape)
          or (b.dtype == torch.uint8 and tuple(b.shape) == (layout.block_nbytes,)))
    if not ok:
        raise PayloadError(
            f"{what} has shape {tuple(b.shape)} and dtype {_name(b.dtype)}; layout {layout.model_id} needs "
            f"{layout.block_shape} of {layout.dtype} or ({layout.block_nbytes},) of uint8")
    if not b.is_contiguous():
        raise PayloadError(f"{what} with strides {b.stride()} is not contiguous")
    return b.reshape(-1).view(torch.uint8)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
