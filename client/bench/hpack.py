"""HPACK (RFC 7541) for the load generator's own HTTP/2 client: a full decoder, a small encoder.

The decoder must be complete: the server's encoder (gRPC C-core, Go, Envoy...) picks indexing,
Huffman coding and table-size updates as it likes, and one misread block desynchronises the
dynamic table for the rest of the connection. The encoder only ever writes literals without
indexing, so it never touches the peer's table state: our request headers are the same on every
call and are encoded once, which is where a per-call saving over grpcio comes from.
"""
from __future__ import annotations

from collections import deque
from typing import Deque, Dict, Iterable, List, Tuple

from trtserve.client.bench._huffman import CODES

__all__ = ["Decoder", "HpackError", "encode_block", "encode_int", "encode_literal", "huffman_decode"]

Header = Tuple[str, str]

STATIC_TABLE: Tuple[Header, ...] = (
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
    (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
    ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""),
    ("cache-control", ""), ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""),
    ("content-length", ""), ("content-location", ""), ("content-range", ""), ("content-type", ""),
    ("cookie", ""), ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""),
    ("proxy-authenticate", ""), ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""),
    ("retry-after", ""), ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""),
    ("transfer-encoding", ""), ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
)
STATIC_NAMES: Dict[str, int] = {}
for _i, (_name, _) in enumerate(STATIC_TABLE, 1):
    STATIC_NAMES.setdefault(_name, _i)

_ENTRY_OVERHEAD = 32  # RFC 7541 4.1: an entry's size is len(name) + len(value) + 32
_DECODE: Dict[Tuple[int, int], int] = {(length, code): sym for sym, (code, length) in enumerate(CODES)}
_MAX_CODE_BITS = max(length for _, length in CODES)
_EOS = 256
_CACHE_BLOCK_BYTES = 512
_CACHE_ENTRIES = 256


class HpackError(ValueError):
    """A header block that breaks RFC 7541; the connection cannot go on (COMPRESSION_ERROR)."""


def huffman_decode(data: bytes) -> bytes:
    """Decodes a Huffman-coded string; padding must be < 8 bits of EOS's leading ones (5.2)."""
    out = bytearray()
    code = length = 0
    for byte in data:
        for shift in range(7, -1, -1):
            code = (code << 1) | ((byte >> shift) & 1)
            length += 1
            sym = _DECODE.get((length, code))
            if sym is not None:
                if sym == _EOS:
                    raise HpackError("Huffman string contains EOS")
                out.append(sym)
                code = length = 0
            elif length > _MAX_CODE_BITS:
                raise HpackError("invalid Huffman code")
    if length > 7 or code != (1 << length) - 1:
        raise HpackError("invalid Huffman padding")
    return bytes(out)


def _decode_int(data: bytes, pos: int, prefix_bits: int) -> Tuple[int, int]:
    """(value, next position) of an integer with an N-bit prefix (5.1)."""
    mask = (1 << prefix_bits) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data):
            raise HpackError("truncated integer")
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
        if shift > 28:
            raise HpackError("integer too large")


def encode_int(value: int, prefix_bits: int, first_byte: int = 0) -> bytes:
    """An integer with an N-bit prefix, ``first_byte`` holding the representation's flag bits."""
    mask = (1 << prefix_bits) - 1
    if value < mask:
        return bytes([first_byte | value])
    out = bytearray([first_byte | mask])
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_str(text: str) -> bytes:
    raw = text.encode("latin-1")  # header values are octets; gRPC metadata is ASCII (or base64 for -bin)
    return encode_int(len(raw), 7) + raw


def encode_literal(name: str, value: str) -> bytes:
    """A literal field without indexing (6.2.2), its name indexed when the static table has it."""
    index = STATIC_NAMES.get(name)
    if index is not None:
        return encode_int(index, 4) + _encode_str(value)
    return b"\x00" + _encode_str(name) + _encode_str(value)


class Decoder:
    """One connection's decoding context: the dynamic table lives as long as the connection."""

    def __init__(self, max_table_size: int = 4096) -> None:
        self._limit = max_table_size  # what we allow (SETTINGS_HEADER_TABLE_SIZE we sent)
        self._max = max_table_size  # what the encoder chose, <= limit
        self._table: Deque[Header] = deque()
        self._size = 0
        # blocks that left the table alone decode the same until it changes: a server repeats the
        # same few blocks (indexed fields plus the odd literal) on every call, so most decodes are a lookup
        self._cache: Dict[bytes, List[Header]] = {}
        self._generation = 0  # counts table changes (insertions, size updates)

    def _evict(self) -> None:
        while self._size > self._max and self._table:
            name, value = self._table.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD

    def _add(self, name: str, value: str) -> None:
        self._generation += 1
        self._table.appendleft((name, value))
        self._size += len(name) + len(value) + _ENTRY_OVERHEAD
        self._evict()  # an entry larger than the table empties it (4.4)

    def _entry(self, index: int) -> Header:
        if 0 < index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        dynamic = index - len(STATIC_TABLE) - 1
        if 0 <= dynamic < len(self._table):
            return self._table[dynamic]
        raise HpackError(f"header index {index} is outside the tables ({len(STATIC_TABLE)} + {len(self._table)})")

    def _string(self, data: bytes, pos: int) -> Tuple[str, int]:
        huffman = data[pos] & 0x80
        length, pos = _decode_int(data, pos, 7)
        end = pos + length
        if end > len(data):
            raise HpackError("truncated string")
        raw = data[pos:end]
        return (huffman_decode(raw) if huffman else raw).decode("latin-1"), end

    def decode(self, block: bytes) -> List[Header]:
        """Every field of one complete header block, in order, updating the dynamic table."""
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        generation = self._generation
        headers = self._decode(block)
        if generation != self._generation:
            self._cache.clear()
        elif len(block) <= _CACHE_BLOCK_BYTES:
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.clear()
            self._cache[block] = headers
        return headers

    def _decode(self, block: bytes) -> List[Header]:
        headers: List[Header] = []
        pos, n = 0, len(block)
        while pos < n:
            byte = block[pos]
            if byte & 0x80:  # indexed field (6.1)
                index, pos = _decode_int(block, pos, 7)
                if index == 0:
                    raise HpackError("header index 0")
                headers.append(self._entry(index))
                continue
            if byte & 0xE0 == 0x20:  # dynamic table size update (6.3)
                size, pos = _decode_int(block, pos, 5)
                if size > self._limit:
                    raise HpackError(f"table size update to {size} above the {self._limit} allowed")
                self._max = size
                self._generation += 1
                self._evict()
                continue
            indexing = byte & 0x40
            index, pos = _decode_int(block, pos, 6 if indexing else 4)
            if index:
                name = self._entry(index)[0]
            else:
                name, pos = self._string(block, pos)
            value, pos = self._string(block, pos)
            if indexing:
                self._add(name, value)
            headers.append((name, value))
        return headers


def encode_block(fields: Iterable[Header]) -> bytes:
    """A header block of literals without indexing (our request headers, encoded once)."""
    return b"".join(encode_literal(name, value) for name, value in fields)
