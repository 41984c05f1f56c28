"""Bad input to the store: each mistake raises its own typed error (a ValueError), names the bad
value, changes nothing, and leaves the store fully usable."""
from __future__ import annotations

import pytest
import torch

from kvstore import Layout
from kvstore.errors import InvalidKeyError, InvalidLayoutError, KVStoreError, PayloadError

from kvtest_support import LAYOUT, NBYTES, assert_consistent, batch, empty_out, make_store, payload, rand_key

__all__ = ["make_store"]

K15 = b"\x07" * 15
BIG = Layout("test/big", num_layers=4, num_kv_heads=2, head_dim=8, dtype="float16", block_tokens=16)  # 4096 B


def typed(n, dtype=torch.float16, shape=None):
    return torch.zeros((n, *(shape or LAYOUT.block_shape)), dtype=dtype)


def non_contiguous(n):
    return torch.zeros((n, 2, 2, 16, 8, 2), dtype=torch.float16).transpose(-1, -2)


CASES_PRESENT = [0, 1]  # two blocks are present when a case runs

# name -> (call(store, present_keys, fresh_keys), error class, substrings the message must name)
CASES = {
    "put wrong shape": (lambda s, p, f: s.put(LAYOUT, f[:2], typed(2, shape=(2, 2, 16, 2, 4))),
                        PayloadError, ["(2, 2, 2, 16, 2, 4)"]),
    "put wrong dtype": (lambda s, p, f: s.put(LAYOUT, f[:2], typed(2, torch.float32)), PayloadError, ["float32"]),
    "put uint8 wrong length": (lambda s, p, f: s.put(LAYOUT, f[:1], torch.zeros((1, NBYTES - 1), dtype=torch.uint8)),
                               PayloadError, [f"(1, {NBYTES - 1})"]),
    "put non-contiguous": (lambda s, p, f: s.put(LAYOUT, f[:2], non_contiguous(2)), PayloadError,
                           ["not contiguous", str(non_contiguous(2).stride())]),
    "put wrong count (batch)": (lambda s, p, f: s.put(LAYOUT, f[:2], typed(3)), PayloadError,
                                ["(3, 2, 2, 16, 2, 8)"]),
    "put wrong count (list)": (lambda s, p, f: s.put(LAYOUT, f[:3], [payload(k) for k in f[:2]]), PayloadError,
                               ["got 2 blocks for 3 keys"]),
    "put not a tensor": (lambda s, p, f: s.put(LAYOUT, f[:1], b"\0" * NBYTES), PayloadError, ["bytes"]),
    "put key of 15 bytes": (lambda s, p, f: s.put(LAYOUT, [f[0], K15], batch([f[0], f[1]])), InvalidKeyError,
                            ["position 1", "got 15", K15.hex()]),
    "put key that is a str": (lambda s, p, f: s.put(LAYOUT, ["0123456789abcdef"], batch(f[:1])), InvalidKeyError,
                              ["str", "'0123456789abcdef'"]),
    "put keys that are one bytes object": (lambda s, p, f: s.put(LAYOUT, f[0], batch(f[:1])), InvalidKeyError,
                                           ["position 0", "int"]),
    "put layout too big": (lambda s, p, f: s.put(BIG, f[:1], torch.zeros((1, 4096), dtype=torch.uint8)),
                           InvalidLayoutError, ["test/big", "4096", str(NBYTES)]),
    "put layout not a Layout": (lambda s, p, f: s.put(LAYOUT.to_dict(), f[:1], batch(f[:1])), InvalidLayoutError,
                                ["dict"]),
    "put parents of wrong length": (lambda s, p, f: s.put(LAYOUT, f[:2], batch(f[:2]), parents=[None]),
                                    InvalidKeyError, ["parents has 1 entries for 2 keys"]),
    "put parent of 15 bytes": (lambda s, p, f: s.put(LAYOUT, f[:2], batch(f[:2]), parents=[None, K15]),
                               InvalidKeyError, ["position 1", "got 15"]),
    "get wrong dtype": (lambda s, p, f: s.get(LAYOUT, p, typed(len(p), torch.bfloat16)), PayloadError,
                        ["bfloat16"]),
    "get wrong shape": (lambda s, p, f: s.get(LAYOUT, p, torch.zeros((len(p), 2, NBYTES // 2), dtype=torch.uint8)),
                        PayloadError, [f"(2, 2, {NBYTES // 2})"]),
    "get non-contiguous": (lambda s, p, f: s.get(LAYOUT, p, non_contiguous(len(p))), PayloadError,
                           ["not contiguous"]),
    "get wrong count": (lambda s, p, f: s.get(LAYOUT, p, empty_out(len(p) + 1)), PayloadError,
                        [f"({len(CASES_PRESENT) + 1}, {NBYTES})"]),
    "get key of 15 bytes": (lambda s, p, f: s.get(LAYOUT, p + [K15], empty_out(len(p) + 1)), InvalidKeyError,
                            ["got 15", K15.hex()]),
    "get key that is a str": (lambda s, p, f: s.get(LAYOUT, ["x" * 16], empty_out(1)), InvalidKeyError,
                              ["str", "'xxxxxxxxxxxxxxxx'"]),
    "get layout too big": (lambda s, p, f: s.get(BIG, p[:1], torch.zeros((1, 4096), dtype=torch.uint8)),
                           InvalidLayoutError, ["4096", str(NBYTES)]),
    "contains key of 15 bytes": (lambda s, p, f: s.contains(p + [K15]), InvalidKeyError, ["got 15", K15.hex()]),
    "contains key that is a str": (lambda s, p, f: s.contains(["abc"]), InvalidKeyError, ["str", "'abc'"]),
    "contains unhashable junk": (lambda s, p, f: s.contains([[1, 2]]), InvalidKeyError, ["list", "[1, 2]"]),
    "contains not a list": (lambda s, p, f: s.contains(iter(p)), InvalidKeyError, ["list_iterator"]),
    "where key of 15 bytes": (lambda s, p, f: s.where([K15]), InvalidKeyError, ["got 15"]),
    "longest_prefix key that is a str": (lambda s, p, f: s.longest_prefix(p + ["zz"]), InvalidKeyError,
                                         ["position 2", "'zz'"]),
    "delete key of 15 bytes": (lambda s, p, f: s.delete([p[0], K15]), InvalidKeyError, ["position 1", "got 15"]),
    "delete key that is an int": (lambda s, p, f: s.delete([p[0], 12345]), InvalidKeyError, ["int", "12345"]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("spec", [("host",), ("hbm", "host", "nvme")], ids=["host", "3tiers"])
def test_bad_input(make_store, name, spec):
    store = make_store(spec, hbm_slots=2, host_slots=8, nvme_slots=8)
    present = [rand_key() for _ in CASES_PRESENT]
    store.put(LAYOUT, present, batch(present))
    fresh = [rand_key() for _ in range(3)]
    before = store.stats()

    call, error, names = CASES[name]
    with pytest.raises(error) as info:
        call(store, present, fresh)
    assert type(info.value) is error
    assert isinstance(info.value, ValueError) and isinstance(info.value, KVStoreError)
    for text in names:
        assert text in str(info.value), (text, str(info.value))

    # Nothing changed: no block stored or deleted, no counter moved, no pin or slot leaked.
    assert store.stats() == before
    assert store.contains(present + fresh) == [True, True, False, False, False]
    assert_consistent(store)
    # ... and the store is fully usable.
    res = store.put(LAYOUT, fresh, batch(fresh))
    assert res.stored == 3
    out = empty_out(5)
    got = store.get(LAYOUT, present + fresh, out)
    assert got.hits == 5 and torch.equal(out, batch(present + fresh))
    assert store.delete(present) == 2
    assert store.contains(present) == [False, False]
    assert_consistent(store)


def test_bytearray_and_memoryview_keys_are_accepted(make_store):
    """Not bad input: a key may come as a bytearray or memoryview of 16 bytes."""
    store = make_store(("host",), host_slots=4)
    k = rand_key()
    store.put(LAYOUT, [bytearray(k)], batch([k]))
    assert store.contains([k, bytearray(k), memoryview(k)]) == [True, True, True]
    assert store.where([bytearray(k)]) == ["host"]
    assert store.longest_prefix([bytearray(k), memoryview(k)]) == 2
    out = empty_out(1)
    assert store.get(LAYOUT, [memoryview(k)], out).hits == 1 and torch.equal(out[0], payload(k))
    assert store.delete([bytearray(k)]) == 1
    assert store.contains([k]) == [False]
    assert_consistent(store)


def test_bad_batch_in_the_middle_is_all_or_nothing(make_store):
    """A put whose last key is bad stores none of the batch."""
    store = make_store(("host",), host_slots=8)
    keys = [rand_key() for _ in range(3)]
    with pytest.raises(InvalidKeyError):
        store.put(LAYOUT, keys + ["bad"], torch.cat([batch(keys), batch(keys[:1])]))
    assert store.contains(keys) == [False] * 3
    assert store.stats()["puts"] == 0
