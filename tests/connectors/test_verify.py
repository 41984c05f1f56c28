"""The verifier's comparison and bookkeeping, without a cluster (connectors/verify.py)."""
from __future__ import annotations

import pytest
import torch

from kvstore.connectors.handoff import Loaded
from kvstore.connectors.verify import DEFAULT_RTOL, Verifier, VerifySettings, compare
from kvstore.layout import Layout

LAYOUT = Layout("test/verify", 2, 2, 8, "float32", 4)


def kv(seed: int, tokens: int = 12):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(tokens, 2, 8, generator=g), torch.randn(tokens, 2, 8, generator=g)) for _ in range(2)]


def test_rounding_noise_passes_and_wrong_blocks_are_named():
    right = kv(0)
    noisy = [(k * (1 + 1e-4), v - 1e-5) for k, v in right]
    assert compare(noisy, right, 4, 0.05, 1e-6) == []
    wrong = [(k.clone(), v.clone()) for k, v in right]
    wrong[1][1][4:8] = kv(1)[1][1][4:8]  # layer 1, V, block 1: another prompt's values
    wrong[0][0][9, 1, 3] = float("nan")  # layer 0, K, block 2: NaN never passes
    failed = compare(wrong, right, 4, 0.05, 1e-6)
    assert [(b, layer, part) for b, layer, part, *_ in failed] == [(1, 1, "v"), (2, 0, "k")]
    assert failed[0][3] > failed[0][4]


def test_the_bound_scales_with_each_heads_magnitude():
    right = kv(2)
    scaled = [(k * torch.tensor([1.0, 1e-3]).view(1, 2, 1), v) for k, v in right]  # head 1 is tiny
    off = [(k.clone(), v.clone()) for k, v in scaled]
    off[0][0][:4, 1] += 1e-3  # small against head 0, as large as head 1 itself
    assert [f[:3] for f in compare(off, scaled, 4, 0.05, 1e-6)] == [(0, 0, "k")]


def test_settings_are_checked_and_rtol_follows_the_dtype():
    with pytest.raises(ValueError):
        VerifySettings(fraction=1.5)
    with pytest.raises(ValueError):
        VerifySettings(first_n=-1)
    assert VerifySettings().rtol_for("bfloat16") == DEFAULT_RTOL["bfloat16"]
    assert VerifySettings(rtol=0.3).rtol_for("float32") == 0.3


class FakeClient:
    """Only what `admit` asks: where each key is held."""

    def __init__(self, where):
        self._where = where
        self.calls = 0

    def where(self, keys):
        self.calls += 1
        return [self._where[k] for k in keys]


def loaded(keys, node="n1"):
    return Loaded(LAYOUT, keys, torch.zeros(len(keys), LAYOUT.block_nbytes, dtype=torch.uint8),
                  [(node, "remote")] * len(keys))


def test_first_n_counts_loads_per_source_and_quarantine_cuts_the_prefix():
    keys = [bytes([i]) * 16 for i in range(4)]
    client = FakeClient({k: [("n1", "CPU")] for k in keys})
    v = Verifier(VerifySettings(fraction=0.0, first_n=2))
    assert [v.admit(client, loaded(keys)).verify for _ in range(3)] == [True, True, False]
    v.quarantined[("n1", "CPU")] = {"since": 0.0, "blocks": 1}
    a = v.admit(client, loaded(keys))
    assert a.loaded.num_blocks == 0 and a.skipped_blocks == 4 and not a.verify
    assert v.stats()["quarantine_skipped_blocks"] == 4
    # Another medium on the same node is another source.
    client2 = FakeClient({k: [("n1", "DISK")] for k in keys})
    assert v.admit(client2, loaded(keys)).verify


def test_no_lookup_when_nothing_depends_on_it():
    keys = [bytes([i]) * 16 for i in range(2)]
    client = FakeClient({k: [("n1", "CPU")] for k in keys})
    v = Verifier(VerifySettings(fraction=0.0, first_n=0))
    assert not v.admit(client, loaded(keys)).verify and client.calls == 0
