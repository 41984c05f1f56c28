"""Layout: the model signature a KV block belongs to.

A block's payload is one contiguous buffer, layer-major:
`[layers][K|V][tokens][kv_heads][head_dim]` (MLA models keep one latent part instead of K and V),
so one layer's part is one slice and a layer-wise save or load moves `layer_nbytes` at a time.

The layout's id is a stable hash of every field and is salted into every block key, so blocks of
different models, dtypes, block sizes or tensor-parallel ranks can never be mixed up.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import re

import msgpack
import torch

from kvstore.errors import InvalidLayoutError

LAYOUT_ID_BYTES = 16

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
_ELEMENT_BYTES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}
_MODEL_ID_RE = re.compile(r"^[\w.\-/:@+]{1,256}$")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The shape of one KV block of one model on one tensor-parallel rank.

    `model_id` should name the weights exactly (include a revision): blocks are reused for any
    request with the same layout and tokens, so two checkpoints under one name would share KV.
    """

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_tokens: int
    tp_rank: int = 0
    tp_size: int = 1
    mla: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not _MODEL_ID_RE.match(self.model_id):
            raise InvalidLayoutError(f"model_id={self.model_id!r} must be 1-256 characters of letters, digits and ._-/:@+")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidLayoutError(f"{name}={value!r} must be a positive integer")
        if (not isinstance(self.tp_rank, int) or isinstance(self.tp_rank, bool)
                or not 0 <= self.tp_rank < self.tp_size):
            raise InvalidLayoutError(f"tp_rank={self.tp_rank!r} must be in [0, tp_size={self.tp_size})")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise InvalidLayoutError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(self.mla, bool):
            raise InvalidLayoutError(f"mla={self.mla!r} must be true or false")
        if self.mla and self.num_kv_heads != 1:
            raise InvalidLayoutError(f"num_kv_heads={self.num_kv_heads!r}: an MLA layout keeps one latent head")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_parts(self) -> int:
        return 1 if self.mla else 2

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block's payload: (layers, K|V, tokens, kv_heads, head_dim)."""
        return (self.num_layers, self.kv_parts, self.block_tokens, self.num_kv_heads, self.head_dim)

    @functools.cached_property
    def layer_nbytes(self) -> int:
        return self.kv_parts * self.block_tokens * self.num_kv_heads * self.head_dim * _ELEMENT_BYTES[self.dtype]

    @functools.cached_property
    def block_nbytes(self) -> int:
        return self.num_layers * self.layer_nbytes

    @functools.cached_property
    def id(self) -> bytes:
        """16 bytes, stable across processes, hosts and Python versions."""
        return _layout_id(self)

    def to_dict(self) -> dict:
        # Every field is a scalar: no deep copy (dataclasses.asdict costs ~35 us, per data-plane request).
        return {f.name: getattr(self, f.name) for f in _FIELDS}

    @classmethod
    def from_dict(cls, data: dict) -> "Layout":
        """The layout a mapping describes (InvalidLayoutError if it is not one). Every data-plane
        request carries its layout: recent ones are remembered, with each value's type (1, 1.0
        and True hash alike, and only an int is a layer count)."""
        if not isinstance(data, dict):
            raise InvalidLayoutError(f"layout must be a mapping, not {type(data).__name__}")
        try:
            return _remembered(tuple((k, type(v), v) for k, v in sorted(data.items())))
        except TypeError:  # keys that do not sort, or an unhashable value: checked (and refused) below
            return cls._parse(data)

    @classmethod
    def _parse(cls, data: dict) -> "Layout":
        unknown = set(data) - _NAMES
        if unknown:
            raise InvalidLayoutError(f"layout has unknown fields {sorted(unknown)!r}")
        try:
            return cls(**data)
        except TypeError as e:
            raise InvalidLayoutError(f"layout {data!r} is incomplete: {e}") from None


_FIELDS = dataclasses.fields(Layout)
_NAMES = frozenset(f.name for f in _FIELDS)


@functools.lru_cache(maxsize=256)
def _remembered(items: tuple) -> Layout:
    return Layout._parse({k: v for k, _, v in items})


def _layout_id(layout: Layout) -> bytes:
    fields = [getattr(layout, f.name) for f in _FIELDS]
    # The field names travel with the values, so adding a field later changes every id only
    # where its value is set.
    canonical = msgpack.packb([[f.name for f in _FIELDS], fields])
    return hashlib.blake2b(canonical, digest_size=LAYOUT_ID_BYTES, person=b"kvstore.layout").digest()
