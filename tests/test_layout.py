"""Layout: the model signature; its id is salted into every key, so it must be stable and total."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from kvstore.errors import InvalidLayoutError
from kvstore.layout import DTYPES, Layout

BASE = dict(model_id="test/model@r1", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16)
# Pinned: the id is part of every key on disk and on the wire, so a change here loses every
# stored block (NVMe after restart, peers of another version). Change it only on purpose.
GOLDEN_ID = "c2cab9e9353fc9311fb05cc7b4dd1465"


def test_id_is_16_bytes_and_pinned():
    layout = Layout(**BASE)
    assert isinstance(layout.id, bytes) and len(layout.id) == 16
    assert layout.id.hex() == GOLDEN_ID
    assert Layout(**BASE).id == layout.id
    assert Layout(**BASE, tp_rank=0, tp_size=1, mla=False).id == layout.id  # defaults spelt out


def test_id_is_the_same_in_another_process():
    code = ("from kvstore.layout import Layout; "
            f"print(Layout(**{BASE!r}).id.hex())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == Layout(**BASE).id.hex()


VARIANTS = {
    "model_id": dict(model_id="test/model@r2"),
    "num_layers": dict(num_layers=3),
    "num_kv_heads": dict(num_kv_heads=4),
    "head_dim": dict(head_dim=16),
    "dtype": dict(dtype="bfloat16"),
    "block_tokens": dict(block_tokens=32),
    "tp_size": dict(tp_size=2),
    "tp_rank": dict(tp_size=2, tp_rank=1),  # against tp_size=2, tp_rank=0 below
    "mla": dict(num_kv_heads=1, mla=True),  # against num_kv_heads=1, mla=False below
}


def test_every_field_has_a_variant():
    assert set(VARIANTS) == {f.name for f in dataclasses.fields(Layout)}


@pytest.mark.parametrize("field", sorted(VARIANTS))
def test_every_field_changes_the_id(field):
    reference = {"tp_rank": dict(tp_size=2, tp_rank=0), "mla": dict(num_kv_heads=1, mla=False)}.get(field, {})
    a = Layout(**{**BASE, **reference})
    b = Layout(**{**BASE, **VARIANTS[field]})
    assert a.id != b.id


def test_all_variant_ids_are_distinct():
    ids = {Layout(**{**BASE, **v}).id for v in VARIANTS.values()} | {Layout(**BASE).id}
    assert len(ids) == len(VARIANTS) + 1


def test_shapes_and_sizes():
    layout = Layout(**BASE)
    assert layout.block_shape == (2, 2, 16, 2, 8)
    assert layout.kv_parts == 2
    assert layout.torch_dtype is torch.float16
    assert layout.layer_nbytes == 2 * 16 * 2 * 8 * 2
    assert layout.block_nbytes == 2 * layout.layer_nbytes == 2048
    mla = Layout(**{**BASE, "num_kv_heads": 1, "mla": True, "dtype": "bfloat16"})
    assert mla.kv_parts == 1
    assert mla.block_shape == (2, 1, 16, 1, 8)
    assert mla.block_nbytes == 2 * 16 * 8 * 2
    f8 = Layout(**{**BASE, "dtype": "float8_e4m3fn"})
    assert f8.block_nbytes == 1024


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_every_dtype_builds_a_tensor_of_block_nbytes(dtype):
    layout = Layout(**{**BASE, "dtype": dtype})
    t = torch.zeros(layout.block_shape, dtype=layout.torch_dtype)
    assert t.numel() * t.element_size() == layout.block_nbytes


BAD = [
    ("model_id", "", "''"),
    ("model_id", "has space", "'has space'"),
    ("model_id", "x" * 257, "'xxxx"),
    ("model_id", 7, "7"),
    ("num_layers", 0, "num_layers=0"),
    ("num_layers", -3, "num_layers=-3"),
    ("num_layers", 2.0, "num_layers=2.0"),
    ("num_layers", True, "num_layers=True"),
    ("num_kv_heads", "2", "num_kv_heads='2'"),
    ("head_dim", None, "head_dim=None"),
    ("block_tokens", 0, "block_tokens=0"),
    ("tp_size", 0, "tp_size=0"),
    ("tp_rank", 1, "tp_rank=1"),
    ("tp_rank", -1, "tp_rank=-1"),
    ("tp_rank", True, "tp_rank=True"),
    ("dtype", "float64", "'float64'"),
    ("dtype", "torch.float16", "'torch.float16'"),
    ("dtype", ["float16"], "['float16']"),
    ("mla", "yes", "mla='yes'"),
]


@pytest.mark.parametrize("field,value,shown", BAD, ids=[f"{f}={v!r:.20}" for f, v, _ in BAD])
def test_bad_field_raises_naming_the_value(field, value, shown):
    with pytest.raises(InvalidLayoutError) as info:
        Layout(**{**BASE, field: value})
    assert shown in str(info.value)
    assert isinstance(info.value, ValueError)


def test_mla_needs_one_head():
    with pytest.raises(InvalidLayoutError, match="num_kv_heads=2"):
        Layout(**{**BASE, "mla": True})


def test_layout_is_frozen_and_hashable():
    layout = Layout(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.num_layers = 4  # type: ignore[misc]
    assert {layout: 1}[Layout(**BASE)] == 1


def test_dict_round_trip():
    layout = Layout(**{**BASE, "tp_size": 4, "tp_rank": 3})
    again = Layout.from_dict(layout.to_dict())
    assert again == layout and again.id == layout.id


def test_from_dict_rejects_unknown_missing_and_non_mappings():
    with pytest.raises(InvalidLayoutError, match="num_layerz"):
        Layout.from_dict({**BASE, "num_layerz": 2})
    partial = dict(BASE)
    del partial["head_dim"]
    with pytest.raises(InvalidLayoutError, match="head_dim"):
        Layout.from_dict(partial)
    with pytest.raises(InvalidLayoutError, match="list"):
        Layout.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(InvalidLayoutError, match="num_layers=0"):
        Layout.from_dict({**BASE, "num_layers": 0})


def test_from_dict_remembers_layouts_but_never_across_value_types():
    """Parsed layouts are remembered (every data-plane request carries one), and 1, 1.0 and True
    hash alike: a layout seen with num_layers=1 or mla=False must not make True or 0 pass."""
    seen = Layout.from_dict({**BASE, "num_layers": 1, "mla": False})
    assert Layout.from_dict({**BASE, "num_layers": 1, "mla": False}) is seen
    for field, value in (("num_layers", True), ("num_layers", 1.0), ("mla", 0)):
        body = {**BASE, "num_layers": 1, "mla": False, field: value}
        with pytest.raises(InvalidLayoutError, match=field):
            Layout.from_dict(body)
    with pytest.raises(InvalidLayoutError, match="num_layers"):
        Layout.from_dict({**BASE, "num_layers": [1]})  # unhashable: checked without the memory
