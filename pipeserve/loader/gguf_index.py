"""A lean GGUF reader: scalar metadata and the tensor table, with tensor data memory-mapped on demand.

`gguf.GGUFReader` builds numpy views for every part of every metadata field, the tokenizer's 49k-entry
string arrays included: seconds of work on a small CPU before the first tensor can be read. A stage
process (a replacement during a recovery above all) needs only a few scalars and the tensor table, so this
walks the header with `struct`, skips arrays by their lengths, and keeps scalar and string values only.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quant_shape_to_byte_shape

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_PLAIN_DTYPES = {  # tensor types stored as plain numpy items rather than quantized blocks
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array of strings, not read: only its length is kept."""

    length: int

    def __len__(self) -> int:
        return self.length


@dataclass
class GGUFTensor:
    """One tensor's entry; `data` maps its bytes (read-only) only when asked."""

    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    tensor_type: GGMLQuantizationType
    offset: int  # from the start of the file
    _file: np.memmap

    @cached_property
    def data(self) -> np.ndarray:
        """The raw tensor, shaped as `gguf.quants.dequantize` expects (numpy order: slowest first)."""
        np_shape = tuple(reversed(self.shape))
        plain = _PLAIN_DTYPES.get(self.tensor_type)
        if plain is not None:
            count = int(np.prod(np_shape))
            return self._file[self.offset:self.offset + count * np.dtype(plain).itemsize].view(plain).reshape(np_shape)
        block, block_bytes = GGML_QUANT_SIZES[self.tensor_type]
        nbytes = int(np.prod(np_shape)) // block * block_bytes
        rows = quant_shape_to_byte_shape(np_shape, self.tensor_type)
        return self._file[self.offset:self.offset + nbytes].reshape(rows)


class GGUFIndex:
    """The metadata scalars (`get`) and tensor table (`tensors`) of a GGUF file."""

    def __init__(self, path: str):
        self.path = path
        self._file = np.memmap(path, dtype=np.uint8, mode="r")
        self._buf = memoryview(self._file)
        self._pos = 0
        if bytes(self._buf[:4]) != _MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        self._pos = 4
        version, n_tensors, n_fields = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old (2 or later is read)")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I"))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = int(self.fields.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = [GGUFTensor(name, shape, kind, data_start + offset, self._file)
                        for name, shape, kind, offset in infos]
        self._buf.release()

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    # ---- the header, read with struct --------------------------------------------------------------

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        text = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return text

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item_kind, count = self._unpack("<I"), self._unpack("<Q")
            if item_kind == _STRING:  # token lists: skip by length, never decode 49k strings
                for _ in range(count):
                    self._pos += 8 + struct.unpack_from("<Q", self._buf, self._pos)[0]
                return SkippedArray(count)
            if item_kind == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
            fmt = _SCALARS[item_kind]
            size = struct.calcsize(fmt)
            values = list(struct.unpack_from(f"<{count}{fmt[1]}", self._buf, self._pos))
            self._pos += size * count
            return values
        return self._unpack(_SCALARS[kind])

    def _tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._string()
        n_dims = self._unpack("<I")
        shape = tuple(self._unpack("<Q") for _ in range(n_dims))
        return name, shape, GGMLQuantizationType(self._unpack("<I")), self._unpack("<Q")
