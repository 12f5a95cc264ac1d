"""Read single initializers of an ONNX file without parsing (or holding) the whole graph.

An exported UNet is a protobuf of about a gigabyte, almost all of it initializer bytes. Loading it
with :func:`onnx.load` to read the few tensors a LoRA touches costs seconds and the model's size in
memory. Here the file is memory-mapped and its protobuf fields walked: ``ModelProto.graph`` (field 7)
-> ``GraphProto.initializer`` (field 5) -> each ``TensorProto``'s name, dtype, dims and where its
bytes are (``raw_data``, or ``external_data`` beside the file). Only the tensors asked for are read.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np

if TYPE_CHECKING:
    import torch

# onnx.TensorProto.DataType -> numpy dtype, for the types exported weights use.
_DTYPES: Final[dict[int, np.dtype]] = {
    1: np.dtype(np.float32),
    6: np.dtype(np.int32),
    7: np.dtype(np.int64),
    10: np.dtype(np.float16),
    11: np.dtype(np.float64),
}

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class OnnxIndexError(ValueError):
    """The file is not an ONNX model this reader understands (e.g. weights stored as float_data)."""


@dataclass(frozen=True)
class InitializerRef:
    """Where one initializer's bytes are: ``file`` at ``offset``, ``length`` bytes."""

    name: str
    dtype: np.dtype
    dims: tuple[int, ...]
    file: Path
    offset: int
    length: int


def _varint(buf: mmap.mmap | bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, wire type, value or payload start, payload end)`` of one message."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value, pos
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            yield number, wire, pos, pos + length
            pos += length
        elif wire == _I64:
            yield number, wire, pos, pos + 8
            pos += 8
        elif wire == _I32:
            yield number, wire, pos, pos + 4
            pos += 4
        else:
            raise OnnxIndexError(f"unsupported protobuf wire type {wire}")


def _tensor(buf: mmap.mmap, start: int, end: int, path: Path) -> InitializerRef | None:
    dims: list[int] = []
    dtype = name = None
    raw: tuple[int, int] | None = None
    external: dict[str, str] = {}
    for number, wire, a, b in _fields(buf, start, end):
        if number == 1:  # dims: packed or not
            if wire == _VARINT:
                dims.append(a)
            else:
                pos = a
                while pos < b:
                    value, pos = _varint(buf, pos)
                    dims.append(value)
        elif number == 2:
            dtype = a
        elif number == 8:
            name = bytes(buf[a:b]).decode()
        elif number == 9:
            raw = (a, b - a)
        elif number == 13:  # StringStringEntryProto {1: key, 2: value}
            entry = {k: bytes(buf[x:y]).decode() for k, _, x, y in _fields(buf, a, b)}
            external[entry.get(1, "")] = entry.get(2, "")
    if name is None or dtype is None:
        return None
    if dtype not in _DTYPES:
        raise OnnxIndexError(f"initializer '{name}' has ONNX data type {dtype}, not a weight type")
    count = int(np.prod(dims)) if dims else 1
    nbytes = count * _DTYPES[dtype].itemsize
    if raw is not None:
        file, offset, length = path, raw[0], raw[1]
    elif external:
        file = path.parent / external["location"]
        offset, length = int(external.get("offset", 0)), int(external.get("length", nbytes))
    elif count == 0:
        file, offset, length = path, 0, 0
    else:
        raise OnnxIndexError(f"initializer '{name}' keeps its values in typed fields, not raw bytes")
    if length != nbytes:
        raise OnnxIndexError(f"initializer '{name}': {length} bytes for shape {dims} of {_DTYPES[dtype]}")
    return InitializerRef(name, _DTYPES[dtype], tuple(dims), file, offset, length)


def initializer_index(path: Path) -> dict[str, InitializerRef]:
    """Every initializer of the ONNX file ``path``: name -> where its bytes are."""
    path = Path(path)
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        graph = next(((a, b) for n, w, a, b in _fields(buf, 0, len(buf)) if n == 7 and w == _LEN), None)
        if graph is None:
            raise OnnxIndexError(f"{path} holds no graph")
        index: dict[str, InitializerRef] = {}
        for number, wire, a, b in _fields(buf, *graph):
            if number == 5 and wire == _LEN:
                ref = _tensor(buf, a, b, path)
                if ref is not None:
                    index[ref.name] = ref
    return index


def read_initializer(ref: InitializerRef) -> np.ndarray:
    """The value of ``ref`` in a new array, read straight into it (a few tensors out of a large file)."""
    array = np.empty(ref.dims, dtype=ref.dtype)
    with ref.file.open("rb", buffering=0) as fh:
        fh.seek(ref.offset)
        view, done = array.reshape(-1).view(np.uint8).data, 0
        while done < ref.length:
            n = fh.readinto(view[done:])
            if not n:
                raise OnnxIndexError(f"{ref.file} ends inside initializer '{ref.name}'")
            done += n
    return array


class LazyOnnxState(Mapping[str, "torch.Tensor"]):
    """A component's state dict read from its ONNX file on demand: keys are the torch parameter
    names (``initializer name - prefix``), each value a new torch tensor read when asked for."""

    def __init__(self, index: Mapping[str, InitializerRef], prefix: str) -> None:
        self._refs = {
            name.removeprefix(prefix): ref for name, ref in index.items() if name.startswith(prefix)
        }
        self.shapes: Mapping[str, tuple[int, ...]] = {k: ref.dims for k, ref in self._refs.items()}
        self.dtypes: Mapping[str, str] = {k: ref.dtype.name for k, ref in self._refs.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        import torch

        return torch.from_numpy(read_initializer(self._refs[key]))

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)
