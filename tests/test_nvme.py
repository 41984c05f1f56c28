"""The NVMe tier: recovery at restart, corruption never served, geometry checks, O_DIRECT fallback."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import struct
import tempfile
import threading

import pytest
import torch

from kvstore import block_keys, chain_parents
from kvstore.errors import ConfigError, TierIOError
from kvstore.events import BlockRemoved, BlockStored
from kvstore.tiers import nvme as nvme_mod
from kvstore.tiers.base import PAGE, SlotMeta, round_up
from kvstore.tiers.nvme import FILE_NAME, NVMeTier

from kvtest_support import (LAYOUT, NBYTES, EventLog, assert_consistent, batch, empty_out, make_store,
                            nvme_capacity, payload, rand_key)

__all__ = ["make_store"]


def supports_o_direct(directory) -> bool:
    path = os.path.join(str(directory), ".odirect-probe")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    else:
        os.close(fd)
        return True
    finally:
        if os.path.exists(path):
            os.unlink(path)


def slot_offsets(path, key: bytes) -> tuple[int, int]:
    """(header offset, payload offset) of the slot holding `key` in the tier's file, found from
    the headers as the format says: a superblock page, the chunk table (a stride per chunk),
    128-byte headers (ids_per_chunk per chunk), page-aligned chunks of slots."""
    with open(path, "rb") as f:
        data = f.read()
    _, version, _, chunk_bytes, ids, num_chunks = struct.unpack_from("<8sIQQQQ", data, 0)
    assert version == 3
    strides = struct.unpack_from(f"<{num_chunks}Q", data, PAGE)
    headers = PAGE + round_up(num_chunks * 8)
    payloads = headers + round_up(num_chunks * ids * 128)
    for slot in range(num_chunks * ids):
        off = headers + slot * 128
        if data[off:off + 8] == b"KVBLOCK2" and data[off + 8:off + 24] == key:
            chunk, i = divmod(slot, ids)
            return off, payloads + chunk * chunk_bytes + i * strides[chunk]
    raise AssertionError(f"no slot holds {key.hex()}")


def flip(path, offset: int, n: int = 4) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))
        f.flush()
        os.fsync(f.fileno())


def fill(store, n: int, chained: bool = False):
    """Puts n blocks one at a time (so most of them demote to NVMe); returns their keys."""
    keys = block_keys(list(range(n * LAYOUT.block_tokens)), LAYOUT, f"ns{rand_key().hex()}")
    parents = chain_parents(keys) if chained else [None] * n
    for k, p in zip(keys, parents):
        assert store.put(LAYOUT, [k], batch([k]), parents=[p]).stored == 1
    return keys


def on_nvme(store, keys):
    return [k for k, w in zip(keys, store.where(keys)) if w == "nvme"]


# -- restart ------------------------------------------------------------------------------------

def test_restart_recovers_what_was_on_nvme(make_store, tmp_path):
    d = tmp_path / "nv"
    store = make_store(("host", "nvme"), host_slots=2, nvme_slots=16, nvme_dir=d)
    keys = fill(store, 10, chained=True)
    durable = on_nvme(store, keys)
    assert len(durable) == 8
    if supports_o_direct(d):
        assert store.tiers[1].direct_io is True and store.stats()["tiers"][1]["direct_io"] is True
    store.close()

    log = EventLog()
    again = make_store(("host", "nvme"), host_slots=2, nvme_slots=16, nvme_dir=d, listener=log)
    # What was on NVMe is back there; what was in host memory is gone.
    assert again.where(keys) == ["nvme" if k in durable else None for k in keys]
    assert again.stats()["blocks"] == 8
    assert again.stats()["tiers"][1]["corrupt_dropped"] == 0
    # Announced at open, with the chain's parents as stored in the headers.
    assert set(log.where) == set(durable) and set(log.where.values()) == {"DISK"}
    parents = {}
    for e in log.of(BlockStored):
        for k, p in zip(e.block_hashes, [e.parent_block_hash, *e.block_hashes[:-1]]):
            parents[k] = p
    assert parents == {k: keys[i - 1] if i else None for i, k in enumerate(keys) if k in durable}
    out = empty_out(8)
    got = again.get(LAYOUT, durable, out)
    assert got.tiers == ["nvme"] * 8
    assert torch.equal(out, batch(durable))
    assert_consistent(again)
    # The recovered store goes on working: new puts, demotions, restarts.
    more = fill(again, 3)
    assert again.contains(more) == [True] * 3
    assert_consistent(again)


def test_restart_of_an_nvme_only_store(make_store, tmp_path):
    d = tmp_path / "nv"
    store = make_store(("nvme",), nvme_slots=4, nvme_dir=d)
    keys = [rand_key() for _ in range(6)]
    res = store.put(LAYOUT, keys, batch(keys))
    assert res.stored == 6 and store.contains(keys) == [False] * 2 + [True] * 4
    store.close()
    again = make_store(("nvme",), nvme_slots=4, nvme_dir=d)
    assert again.contains(keys) == [False] * 2 + [True] * 4
    out = empty_out(4)
    assert again.get(LAYOUT, keys[2:], out).hits == 4 and torch.equal(out, batch(keys[2:]))


def test_deleted_blocks_do_not_come_back(make_store, tmp_path):
    d = tmp_path / "nv"
    store = make_store(("host", "nvme"), host_slots=2, nvme_slots=8, nvme_dir=d)
    keys = fill(store, 6)
    gone = on_nvme(store, keys)[:2]
    assert store.delete(gone) == 2
    store.close()
    again = make_store(("host", "nvme"), host_slots=2, nvme_slots=8, nvme_dir=d)
    assert again.contains(gone) == [False, False]
    assert again.stats()["blocks"] == 2  # the other two that were on nvme
    assert again.stats()["tiers"][1]["corrupt_dropped"] == 0  # erased, not damaged
    again.clear()
    again.close()
    third = make_store(("host", "nvme"), host_slots=2, nvme_slots=8, nvme_dir=d)
    assert third.stats()["blocks"] == 0


# -- corruption ---------------------------------------------------------------------------------

def test_corrupt_payload_is_a_miss_and_is_dropped(make_store, tmp_path, caplog):
    d = tmp_path / "nv"
    log = EventLog()
    store = make_store(("host", "nvme"), host_slots=2, nvme_slots=8, nvme_dir=d, listener=log)
    keys = fill(store, 6)
    victim, *others = on_nvme(store, keys)
    flip(d / FILE_NAME, slot_offsets(d / FILE_NAME, victim)[1] + 100)

    out = empty_out(1)
    with caplog.at_level(logging.WARNING, logger="kvstore"):
        got = store.get(LAYOUT, [victim], out)
    assert got.tiers == [None]
    assert "checksum" in caplog.text and victim.hex() in caplog.text
    assert store.contains([victim]) == [False]
    stats = store.stats()
    assert stats["corrupt_dropped"] == 1 and stats["tiers"][1]["corrupt_dropped"] == 1
    assert stats["misses"] == 1
    assert log.events[-1] == BlockRemoved([victim], "DISK")
    assert_consistent(store)
    # Every other block is still served, from either tier.
    out = empty_out(5)
    rest = [k for k in keys if k != victim]
    assert store.get(LAYOUT, rest, out).hits == 5 and torch.equal(out, batch(rest))
    # The store keeps working, and the damaged slot is reused.
    new = fill(store, 4)
    assert store.contains(new) == [True] * 4
    assert_consistent(store)
    store.close()
    again = make_store(("host", "nvme"), host_slots=2, nvme_slots=8, nvme_dir=d)
    assert again.contains([victim]) == [False]
    assert again.stats()["tiers"][1]["corrupt_dropped"] == 0


def test_corrupt_payload_in_a_batch(make_store, tmp_path):
    d = tmp_path / "nv"
    store = make_store(("host", "nvme"), host_slots=2, nvme_slots=8, nvme_dir=d, promote_on_hit=False)
    keys = fill(store, 6)
    durable = on_nvme(store, keys)
    flip(d / FILE_NAME, slot_offsets(d / FILE_NAME, durable[1])[1] + NBYTES - 4)  # the last bytes
    out = empty_out(4)
    got = store.get(LAYOUT, durable, out)
    assert got.found == [True, False, True, True]
    for i in (0, 2, 3):
        assert torch.equal(out[i], payload(durable[i]))
    assert store.stats()["corrupt_dropped"] == 1
    assert_consistent(store)


@pytest.mark.parametrize("where,what", [(8, "key"), (0, "magic"), (24, "layout id"), (56, "length"),
                                        (120, "checksum")])
def test_corrupt_header_is_dropped_at_reopen(make_store, tmp_path, caplog, where, what):
    d = tmp_path / "nv"
    store = make_store(("host", "nvme"), host_slots=2, nvme_slots=8, nvme_dir=d)
    keys = fill(store, 6)
    victim, *others = on_nvme(store, keys)
    store.close()
    flip(d / FILE_NAME, slot_offsets(d / FILE_NAME, victim)[0] + where)
    with caplog.at_level(logging.WARNING, logger="kvstore"):
        again = make_store(("host", "nvme"), host_slots=2, nvme_slots=8, nvme_dir=d)
    assert "header fails its checksum" in caplog.text
    assert again.contains([victim] + others) == [False, True, True, True]
    assert again.stats()["tiers"][1]["corrupt_dropped"] == 1
    assert again.stats()["blocks"] == 3
    assert_consistent(again)
    # Its slot is free again: the tier can be filled to capacity.
    assert again.tiers[1].allocator.free_count == 8 - 3
    out = empty_out(3)
    assert again.get(LAYOUT, others, out).hits == 3 and torch.equal(out, batch(others))


def test_tier_level_checks_key_and_erasure(tmp_path):
    tier = NVMeTier(str(tmp_path), NBYTES, nvme_capacity(2), io_threads=1)
    try:
        k = rand_key()
        meta = SlotMeta(k, LAYOUT.id, NBYTES)
        assert tier.write_many([(0, payload(k), meta)]) == [None]
        out = torch.zeros(NBYTES, dtype=torch.uint8)
        assert tier.read_many([(0, out, meta)]) == [None] and torch.equal(out, payload(k))
        # Asking slot 0 for another key is refused, not served.
        [err] = tier.read_many([(0, out, SlotMeta(rand_key(), LAYOUT.id, NBYTES))])
        assert "holds block " + k.hex() in str(err)
        tier.erase(0)
        [err] = tier.read_many([(0, out, meta)])
        assert "erased" in str(err)
        assert tier.stats()["corrupt_dropped"] == 2
        assert tier.stats()["bytes_written"] == NBYTES and tier.stats()["bytes_read"] == NBYTES
    finally:
        tier.close()
    tier.close()  # twice is harmless


# -- geometry and configuration ------------------------------------------------------------------

def test_geometry_mismatch_at_reopen(tmp_path):
    NVMeTier(str(tmp_path), NBYTES, nvme_capacity(4)).close()
    with pytest.raises(ConfigError) as info:
        NVMeTier(str(tmp_path), 2 * NBYTES, nvme_capacity(4, 2 * NBYTES))
    msg = str(info.value)
    assert f"{NBYTES} bytes" in msg and f"{2 * NBYTES} bytes" in msg and FILE_NAME in msg
    with pytest.raises(ConfigError) as info:
        NVMeTier(str(tmp_path), NBYTES, nvme_capacity(6))
    assert "4 slots" in str(info.value) and "6 slots" in str(info.value)
    # The file was left alone: the right geometry still opens it.
    NVMeTier(str(tmp_path), NBYTES, nvme_capacity(4)).close()


@pytest.mark.parametrize("capacity", [0, 100, PAGE, nvme_capacity(1) - 1])
def test_too_small_capacity(tmp_path, capacity):
    with pytest.raises(ConfigError) as info:
        NVMeTier(str(tmp_path / "nv"), NBYTES, capacity)
    assert f"nvme_tier_bytes={capacity}" in str(info.value)
    assert not (tmp_path / "nv" / FILE_NAME).exists()


def test_exact_capacity(tmp_path):
    tier = NVMeTier(str(tmp_path), NBYTES, nvme_capacity(3))
    try:
        assert tier.num_slots == 3
        assert os.path.getsize(tier.path) == tier.file_bytes == nvme_capacity(3)
    finally:
        tier.close()


def test_a_foreign_file_is_refused(tmp_path):
    (tmp_path / FILE_NAME).write_bytes(b"not a tier" * 1000)
    with pytest.raises(TierIOError, match="is not a kvstore NVMe tier file"):
        NVMeTier(str(tmp_path), NBYTES, nvme_capacity(2))
    (tmp_path / FILE_NAME).write_bytes(b"tiny")
    with pytest.raises(TierIOError, match="shorter than one page"):
        NVMeTier(str(tmp_path), NBYTES, nvme_capacity(2))


def test_directory_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TierIOError) as info:
        NVMeTier(str(blocker / "sub"), NBYTES, nvme_capacity(2))
    assert str(blocker / "sub") in str(info.value)


def test_preallocation_failure_is_clear(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nvme_mod.os, "posix_fallocate", no_space)
    with pytest.raises(TierIOError) as info:
        NVMeTier(str(tmp_path), NBYTES, nvme_capacity(2))
    assert str(nvme_capacity(2)) in str(info.value) and "No space" in str(info.value)
    assert not (tmp_path / FILE_NAME).exists()


# -- O_DIRECT ------------------------------------------------------------------------------------

@pytest.fixture
def shm_dir():
    d = tempfile.mkdtemp(prefix=f"kvtestdir-{os.getpid()}-", dir="/dev/shm")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_direct_io_fallback_on_tmpfs(make_store, shm_dir, monkeypatch, caplog):
    if supports_o_direct(shm_dir):
        # Newer kernels give tmpfs O_DIRECT; make it refuse as older ones (and overlayfs) do.
        real_open = os.open

        def refusing_open(path, flags, *args, **kwargs):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(nvme_mod.os, "open", refusing_open)
    with caplog.at_level(logging.WARNING, logger="kvstore"):
        store = make_store(("host", "nvme"), host_slots=2, nvme_slots=8, nvme_dir=shm_dir)
    monkeypatch.undo()
    assert store.tiers[1].direct_io is False
    assert store.stats()["tiers"][1]["direct_io"] is False
    assert "refuses O_DIRECT" in caplog.text and shm_dir in caplog.text
    keys = fill(store, 6)
    assert len(on_nvme(store, keys)) == 4
    out = empty_out(6)
    assert store.get(LAYOUT, keys, out).hits == 6 and torch.equal(out, batch(keys))
    assert_consistent(store)
    durable = on_nvme(store, keys)
    store.close()
    again = make_store(("host", "nvme"), host_slots=2, nvme_slots=8, nvme_dir=shm_dir, direct_io=False)
    assert set(on_nvme(again, keys)) == set(durable)


def test_direct_io_off_by_request(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kvstore"):
        tier = NVMeTier(str(tmp_path), NBYTES, nvme_capacity(2), direct_io=False)
    try:
        assert tier.direct_io is False and "O_DIRECT" not in caplog.text
    finally:
        tier.close()


def test_other_open_errors_are_tier_io_errors(tmp_path, monkeypatch):
    def denied(path, flags, *args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(nvme_mod.os, "open", denied)
    with pytest.raises(TierIOError) as info:
        NVMeTier(str(tmp_path), NBYTES, nvme_capacity(2))
    assert str(tmp_path / FILE_NAME) in str(info.value) and "Permission denied" in str(info.value)


def test_truncated_file_is_refused_at_reopen(tmp_path):
    from kvtest_support import SLOT, nvme_capacity

    NVMeTier(str(tmp_path), SLOT, nvme_capacity(4)).close()
    path = tmp_path / FILE_NAME
    os.truncate(path, os.path.getsize(path) - PAGE)
    with pytest.raises(TierIOError, match="truncated"):
        NVMeTier(str(tmp_path), SLOT, nvme_capacity(4))


# -- the header region and format versions -------------------------------------------------------

def test_a_version_1_file_is_refused_with_its_version_named(tmp_path):
    NVMeTier(str(tmp_path), NBYTES, nvme_capacity(4)).close()
    path = tmp_path / FILE_NAME
    with open(path, "r+b") as f:  # the superblock of a file written before the header region
        f.write(struct.pack("<8sI", b"KVSTNVME", 1))
    with pytest.raises(TierIOError) as info:
        NVMeTier(str(tmp_path), NBYTES, nvme_capacity(4))
    msg = str(info.value)
    assert "format version 1" in msg and "version 3" in msg and "remove the file" in msg and str(path) in msg
    assert path.exists()  # refused, never deleted


def test_open_reads_the_header_region_and_nothing_else(tmp_path, monkeypatch):
    slots = 300
    tier = NVMeTier(str(tmp_path), NBYTES, nvme_capacity(slots), io_threads=2)
    keys = [rand_key() for _ in range(slots)]
    assert tier.write_many([(i, payload(k), SlotMeta(k, LAYOUT.id, NBYTES)) for i, k in enumerate(keys)]) \
        == [None] * slots
    tier.close()
    read = []
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset):
        got = real_preadv(fd, buffers, offset)
        read.append((offset, got))
        return got

    monkeypatch.setattr(nvme_mod.os, "preadv", counting_preadv)
    again = NVMeTier(str(tmp_path), NBYTES, nvme_capacity(slots), io_threads=2)
    try:
        assert sum(got for _, got in read) == PAGE + nvme_mod.header_region_bytes(slots) == PAGE + 10 * PAGE
        assert all(offset < again.payload_offset(0) for offset, _ in read)
        assert sorted(meta.key for _, meta in again.recovered()) == sorted(keys)
        assert again.allocator.free_count == 0
    finally:
        again.close()


def test_open_in_chunks_keeps_the_newest_copy_and_drops_damaged_headers(tmp_path, monkeypatch):
    """Headers written in bulk (as bench.scale_storage does) and read back over several chunks,
    the next one read while the last is checked."""
    monkeypatch.setattr(nvme_mod, "_SCAN_CHUNK", 2 * PAGE)  # 64 headers a chunk
    slots = 500
    NVMeTier(str(tmp_path), NBYTES, nvme_capacity(slots)).close()
    keys = [rand_key() for _ in range(slots)]
    keys[400] = keys[10]  # a second copy of a key, newer (see generations below)
    parents = [None] + keys[:-1]
    headers = nvme_mod.pack_headers(keys, [LAYOUT.id] * slots, parents, [NBYTES] * slots,
                                    list(range(1, slots + 1)), list(range(slots)))
    headers[[3, 130, 499]] = 0  # never written or erased
    headers[200, 9] ^= 1  # a damaged payload checksum: the header's own checksum fails
    with open(tmp_path / FILE_NAME, "r+b") as f:
        f.seek(PAGE + nvme_mod.table_bytes(slots))  # after the superblock and the chunk table
        f.write(headers.tobytes())
    tier = NVMeTier(str(tmp_path), NBYTES, nvme_capacity(slots))
    try:
        found = dict(tier.recovered())
        assert sorted(found) == sorted(set(range(slots)) - {3, 130, 499, 200, 10})
        assert found[400].key == keys[10] and found[400].checksum == 400
        assert found[401].parent == keys[10] and found[0].parent is None
        assert all(found[s].key == keys[s] and found[s].nbytes == NBYTES for s in found)
        assert tier.stats()["corrupt_dropped"] == 1
        assert tier.allocator.free_count == 5
        # New blocks get a generation above every one found, so they win over older copies.
        k = keys[20]
        free = tier.allocator.alloc()
        assert tier.write_many([(free, payload(k), SlotMeta(k, LAYOUT.id, NBYTES))]) == [None]
    finally:
        tier.close()
    again = NVMeTier(str(tmp_path), NBYTES, nvme_capacity(slots))
    try:
        slots_of_k = [s for s, meta in again.recovered() if meta.key == keys[20]]
        assert slots_of_k == [free]
    finally:
        again.close()


def test_headers_sharing_a_page_written_at_once_all_land(tmp_path):
    """32 headers share a page, and each write reads the page, patches it and writes it back:
    writers of neighbouring slots on several threads (the store's concurrent puts and moves)
    must not undo each other."""
    slots, writers = 96, 6
    tier = NVMeTier(str(tmp_path), NBYTES, nvme_capacity(slots), io_threads=2)
    keys = [rand_key() for _ in range(slots)]

    def write(first: int) -> None:
        for slot in range(first, slots, writers):
            assert tier.write_many([(slot, payload(keys[slot]), SlotMeta(keys[slot], LAYOUT.id, NBYTES))]) == [None]
            if slot % 2 == 0:
                tier.erase(slot)

    threads = [threading.Thread(target=write, args=(first,)) for first in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tier.close()
    again = NVMeTier(str(tmp_path), NBYTES, nvme_capacity(slots))
    try:
        assert {s: m.key for s, m in again.recovered()} == {s: keys[s] for s in range(1, slots, 2)}
    finally:
        again.close()
