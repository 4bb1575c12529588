"""A GGUF file cut into its parts (header, key/value records, tensor records, data) so mutations can aim at one.

Written independently of laformer's reader on purpose: the fuzzer must not share the parser it is testing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
HEADER = struct.Struct("<4sIQQ")


@dataclass
class Record:
    """One key/value or tensor record: its bytes and where its fields start (absolute offsets)."""

    start: int
    end: int
    fields: dict[str, int]  # field name -> offset of that field
    kind: int = -1  # value type of a key/value record
    key: str = ""


@dataclass
class Layout:
    data: bytes
    kvs: list[Record]
    tensors: list[Record]
    data_start: int

    def section(self, name: str) -> tuple[int, int]:
        """Byte range of "header", "metadata", "tensor_info" or "data"."""
        meta_end = self.kvs[-1].end if self.kvs else HEADER.size
        info_end = self.tensors[-1].end if self.tensors else meta_end
        return {"header": (0, HEADER.size), "metadata": (HEADER.size, meta_end),
                "tensor_info": (meta_end, info_end), "data": (self.data_start, len(self.data))}[name]

    def rebuild(self, kvs: list[bytes], tensors: list[bytes], alignment: int = 32) -> bytes:
        """A file with these raw records and the original tensor data (offsets are relative to the data start)."""
        magic, version, _, _ = HEADER.unpack_from(self.data)
        body = HEADER.pack(magic, version, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
        return body + b"\0" * (-len(body) % alignment) + self.data[self.data_start:]

    def raw(self, record: Record) -> bytes:
        return self.data[record.start:record.end]


def parse(data: bytes) -> Layout:
    _, _, n_tensors, n_kv = HEADER.unpack_from(data)
    offset, kvs, tensors = HEADER.size, [], []
    for _ in range(n_kv):
        start = offset
        key, offset = _string(data, offset)
        (kind,) = struct.unpack_from("<I", data, offset)
        value_at = offset + 4
        offset = _skip_value(data, value_at, kind)
        kvs.append(Record(start, offset, {"key_length": start, "type": value_at - 4, "value": value_at}, kind, key))
    for _ in range(n_tensors):
        start = offset
        _, offset = _string(data, offset)
        (n_dims,) = struct.unpack_from("<I", data, offset)
        fields = {"name_length": start, "n_dims": offset, "dims": offset + 4, "type": offset + 4 + 8 * n_dims,
                  "offset": offset + 8 + 8 * n_dims, "n_dims_value": n_dims}
        offset += 4 + 8 * n_dims + 12
        tensors.append(Record(start, offset, fields))
    return Layout(data, kvs, tensors, -(-offset // 32) * 32)


def encode_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def encode_kv(key: str, kind: int, value: object) -> bytes:
    """A scalar or string key/value record."""
    if kind == STRING:
        return encode_string(key) + struct.pack("<I", kind) + encode_string(str(value))
    return encode_string(key) + struct.pack("<I", kind) + struct.pack("<" + SCALAR_FORMATS[kind], value)


def _string(data: bytes, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, offset)
    return data[offset + 8:offset + 8 + length].decode(), offset + 8 + length


def _skip_value(data: bytes, offset: int, kind: int) -> int:
    if kind == STRING:
        return _string(data, offset)[1]
    if kind == ARRAY:
        item, count = struct.unpack_from("<IQ", data, offset)
        offset += 12
        for _ in range(count):
            offset = _skip_value(data, offset, item)
        return offset
    return offset + struct.calcsize(SCALAR_FORMATS[kind])
