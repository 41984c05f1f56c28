"""Block keys: chained, salted, deterministic; bad token ids are refused by value."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import InvalidKeyError, InvalidTokensError
from kvstore.keys import KEY_BYTES, block_keys, cache_extra, chain_parents, check_key, check_keys, root_key, token_array
from kvstore.layout import Layout

L = Layout("test/model@r1", 2, 2, 8, "float16", 16)
T = L.block_tokens
TOKENS = list(range(1000, 1000 + 5 * T))
# Pinned: keys live on disk and travel between hosts of possibly different versions.
GOLDEN = ["561da71d3268bd5a2924564705e40ae2", "a53e85899807d6ddb4d3b9ab6e40e765"]


def test_keys_are_16_bytes_one_per_full_block():
    keys = block_keys(TOKENS, L)
    assert len(keys) == 5
    assert all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in keys)
    assert len(set(keys)) == 5


def test_pinned_values():
    assert [k.hex() for k in block_keys(list(range(40)), L, "tenant-a")] == GOLDEN


def test_deterministic_across_processes():
    code = ("import sys; from kvstore.layout import Layout; from kvstore.keys import block_keys; "
            "L = Layout('test/model@r1', 2, 2, 8, 'float16', 16); "
            f"print(','.join(k.hex() for k in block_keys({TOKENS!r}, L, 'tenant-a')))")
    results = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        results.add(out.stdout.strip())
    assert results == {",".join(k.hex() for k in block_keys(TOKENS, L, "tenant-a"))}


def test_same_input_same_keys_any_sequence_type():
    a = block_keys(TOKENS, L)
    assert block_keys(tuple(TOKENS), L) == a
    assert block_keys(np.array(TOKENS, dtype=np.int64), L) == a
    assert block_keys(np.array(TOKENS, dtype=np.uint32), L) == a
    assert block_keys(np.array(TOKENS, dtype=">i4"), L) == a  # big-endian input, same ids
    assert block_keys(np.array(TOKENS + [0] * T, dtype=np.int32)[:len(TOKENS)], L) == a


def test_namespaces_never_share_a_key():
    a = block_keys(TOKENS, L, "tenant-a")
    b = block_keys(TOKENS, L, "tenant-b")
    assert not set(a) & set(b)
    assert root_key(L, "tenant-a") != root_key(L, "tenant-b")


def test_layouts_never_share_a_key():
    other = Layout("test/model@r1", 2, 2, 8, "bfloat16", 16)
    rank1 = Layout("test/model@r1", 2, 2, 8, "float16", 16, tp_rank=1, tp_size=2)
    rank0 = Layout("test/model@r1", 2, 2, 8, "float16", 16, tp_rank=0, tp_size=2)
    sets = [set(block_keys(TOKENS, lay)) for lay in (L, other, rank0, rank1)]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j], (i, j)


def test_prefix_sharing_and_divergence():
    a = block_keys(TOKENS, L)
    changed = list(TOKENS)
    changed[2 * T + 3] += 1  # inside the third block
    b = block_keys(changed, L)
    assert a[:2] == b[:2]
    assert not set(a[2:]) & set(b[2:])  # the chain: every later key differs too


def test_continuation_with_parent_equals_one_long_chain():
    full = block_keys(TOKENS, L, "ns")
    for cut in range(1, 5):
        head = block_keys(TOKENS[:cut * T], L, "ns")
        tail = block_keys(TOKENS[cut * T:], L, "ns", parent=head[-1])
        assert head + tail == full
    # The parent already carries namespace and layout: other ones passed alongside are ignored.
    other = Layout("other/model", 1, 1, 8, "float32", 16)
    assert block_keys(TOKENS[T:], other, "ns2", parent=full[0]) == block_keys(TOKENS[T:], L, "ns", parent=full[0])


@given(st.lists(st.integers(0, 2**32 - 1), max_size=6 * 4), st.integers(0, 6))
@settings(max_examples=50, deadline=None, database=None)
def test_continuation_property(tokens, cut_blocks):
    lay = Layout("m", 1, 1, 8, "float16", 4)
    full = block_keys(tokens, lay)
    cut = min(cut_blocks, len(full))
    head = block_keys(tokens[:cut * 4], lay)
    parent = head[-1] if head else None
    assert head + block_keys(tokens[cut * 4:], lay, parent=parent) == full


def test_partial_tail_is_ignored():
    keys = block_keys(TOKENS, L)
    assert block_keys(TOKENS + [1, 2, 3], L) == keys
    assert block_keys(TOKENS[:-1], L) == keys[:-1]
    assert block_keys(TOKENS[:T - 1], L) == []
    assert block_keys([], L) == []
    assert block_keys(np.array([], dtype=np.float64), L) == []


@pytest.mark.parametrize("tokens,shown", [
    ([1, 2, -1, 4], "-1"),
    ([1, 2**32, 3], str(2**32)),
    ([1, 2**40], str(2**40)),
    ([1, 2**70], str(2**70)),  # too big for int64: NumPy makes an object array
    ([-(2**70), 1], str(-(2**70))),
    (np.array([5, -7], dtype=np.int64), "-7"),
    (np.array([5, 2**33], dtype=np.uint64), str(2**33)),
    ([1, 2.5, 3], "2.5"),
    ([1.0, 2.0], "1.0"),
    (np.array([0.5, 1.5]), "0.5"),
    ([True, False], "True"),
    (["a", "b"], "'a'"),
    ([[1, 2], [3, 4]], "(2, 2)"),
    (np.zeros((2, 16), dtype=np.int64), "(2, 16)"),
    ([[1, 2], [3]], "[[1, 2], [3]]"),  # ragged
    (7, "()"),
])
def test_bad_tokens_raise_naming_the_value(tokens, shown):
    with pytest.raises(InvalidTokensError) as info:
        block_keys(tokens, L)
    assert shown in str(info.value)
    assert isinstance(info.value, ValueError)


def test_token_array_is_little_endian_uint32():
    arr = token_array([0, 1, 2**32 - 1])
    assert arr.dtype == np.dtype("<u4")
    assert arr.tobytes() == b"\0\0\0\0\x01\0\0\0\xff\xff\xff\xff"
    assert token_array(np.array([3, 4], dtype=object)).tolist() == [3, 4]


def test_bad_namespace():
    for ns in ("", "x" * 257, 5, None):
        with pytest.raises(InvalidKeyError) as info:
            block_keys(TOKENS, L, ns)  # type: ignore[arg-type]
        assert repr(ns)[:20] in str(info.value)


def test_bad_parent():
    with pytest.raises(InvalidKeyError, match="got 15"):
        block_keys(TOKENS, L, parent=b"x" * 15)
    with pytest.raises(InvalidKeyError, match="str"):
        block_keys(TOKENS, L, parent="x" * 16)  # type: ignore[arg-type]


def test_check_key():
    k = os.urandom(16)
    assert check_key(k) == k
    assert check_key(bytearray(k)) == k and type(check_key(bytearray(k))) is bytes
    assert check_key(memoryview(k)) == k
    with pytest.raises(InvalidKeyError) as info:
        check_key(b"\x01" * 15, 3)
    assert "position 3" in str(info.value) and "15" in str(info.value) and "01" * 15 in str(info.value)
    with pytest.raises(InvalidKeyError, match="'abc'"):
        check_key("abc")
    with pytest.raises(InvalidKeyError, match="position 1"):
        check_keys([k, 42])


def test_chain_parents():
    keys = block_keys(TOKENS, L)
    assert chain_parents(keys) == [None, *keys[:-1]]
    p = os.urandom(16)
    assert chain_parents(keys, p) == [p, *keys[:-1]]
    assert chain_parents([]) == []


def test_extras_change_every_key_and_empty_extras_change_none():
    plain = block_keys(TOKENS, L, "t")
    assert block_keys(TOKENS, L, "t", extra=b"", block_extra={}) == plain
    salted = block_keys(TOKENS, L, "t", extra=cache_extra(cache_salt="s1"))
    assert not set(salted) & set(plain)
    assert not set(salted) & set(block_keys(TOKENS, L, "t", extra=cache_extra(cache_salt="s2")))
    lora = block_keys(TOKENS, L, "t", extra=cache_extra(lora="adapter-a"))
    assert not set(lora) & (set(salted) | set(plain))


def test_block_extra_changes_that_block_and_every_later_one():
    plain = block_keys(TOKENS, L, "t")
    img = block_keys(TOKENS, L, "t", block_extra={2: cache_extra(mm=[("hash-a", 5)])})
    assert img[:2] == plain[:2]
    assert not set(img[2:]) & set(plain)
    other = block_keys(TOKENS, L, "t", block_extra={2: cache_extra(mm=[("hash-b", 5)])})
    assert other[:2] == plain[:2] and not set(other[2:]) & set(img[2:])


def test_cache_extra_is_canonical_and_refuses_what_it_cannot_encode():
    assert cache_extra(a=1, b="x") == cache_extra(b="x", a=1)
    assert cache_extra(a=None) == b""
    with pytest.raises(InvalidKeyError, match="cannot be encoded"):
        cache_extra(a=object())
    with pytest.raises(InvalidKeyError, match="block_extra\\[0\\]"):
        block_keys(TOKENS, L, block_extra={0: "not bytes"})
