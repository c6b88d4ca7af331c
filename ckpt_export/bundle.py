"""Reading and writing the index of a TensorFlow tensor bundle.

A checkpoint and a SavedModel's `variables/` are tensor bundles: data shards
`<prefix>.data-<i>-of-<n>` and an index `<prefix>.index`. The index is a
LevelDB-format table: key `""` holds a `BundleHeaderProto` (number of shards),
and every other key (a checkpoint key) a `BundleEntryProto` (dtype, shape,
shard id, offset, size and masked crc32c of the tensor's bytes in that shard).
TensorFlow exposes no writer of that table to Python; this module reads and
writes it the way TensorFlow's `table::TableBuilder` does for bundles: no
compression, 256 KiB data blocks, a restart point every 16 entries (every
entry in the index block), shortest separators as index keys.

Checksums are crc32c (the `google-crc32c` package), masked as LevelDB and
TensorFlow mask them.
"""

import struct
from typing import Dict, Iterable, List, Sequence, Tuple

import google_crc32c
from tensorflow.core.protobuf import tensor_bundle_pb2

_BLOCK_SIZE = 256 * 1024
_RESTART_INTERVAL = 16
_MAGIC = 0xdb4775248b80fb57
_FOOTER_SIZE = 48  # Two block handles padded to 40 bytes, then the magic.
_TRAILER_SIZE = 5  # Block type (0: uncompressed) and masked crc32c.
_MASK_DELTA = 0xa282ead8

HEADER_KEY = b''


def masked_crc32c(data: bytes, crc: int = 0) -> int:
  """The masked crc32c of `data` (extending an unmasked `crc`)."""
  return mask(google_crc32c.extend(crc, data))


def mask(crc: int) -> int:
  """Masks a crc32c as LevelDB and TensorFlow store them."""
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xffffffff


def _varint(value: int) -> bytes:
  out = bytearray()
  while value >= 0x80:
    out.append((value & 0x7f) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _read_varint(data: bytes, pos: int) -> Tuple[int, int]:
  value = shift = 0
  while True:
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7f) << shift
    if byte < 0x80:
      return value, pos
    shift += 7


class _Block:
  """A table block being built: prefix-compressed entries, restart points."""

  def __init__(self, restart_interval: int):
    self._restart_interval = restart_interval
    self._parts = []
    self._size = 0
    self._restarts = [0]
    self._count = 0
    self._last_key = b''

  def add(self, key: bytes, value: bytes) -> None:
    shared = 0
    if self._count == self._restart_interval:
      self._restarts.append(self._size)
      self._count = 0
    else:
      limit = min(len(key), len(self._last_key))
      while shared < limit and key[shared] == self._last_key[shared]:
        shared += 1
    part = b''.join((_varint(shared), _varint(len(key) - shared),
                     _varint(len(value)), key[shared:], value))
    self._parts.append(part)
    self._size += len(part)
    self._count += 1
    self._last_key = key

  @property
  def empty(self) -> bool:
    return not self._parts

  def size_estimate(self) -> int:
    return self._size + 4 * len(self._restarts) + 4

  def finish(self) -> bytes:
    return b''.join(self._parts) + struct.pack(
        f'<{len(self._restarts) + 1}I', *self._restarts, len(self._restarts))


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
  """A short key k with start <= k < limit (LevelDB's bytewise comparator)."""
  common = 0
  while (common < min(len(start), len(limit)) and
         start[common] == limit[common]):
    common += 1
  if common < min(len(start), len(limit)):
    byte = start[common]
    if byte < 0xff and byte + 1 < limit[common]:
      return start[:common] + bytes([byte + 1])
  return start


def _short_successor(key: bytes) -> bytes:
  """A short key k >= `key`."""
  for i, byte in enumerate(key):
    if byte != 0xff:
      return key[:i] + bytes([byte + 1])
  return key


def _handle(offset: int, size: int) -> bytes:
  return _varint(offset) + _varint(size)


def write_table(items: Iterable[Tuple[bytes, bytes]]) -> bytes:
  """A LevelDB table of `items`, as TensorFlow writes a bundle's index.

  Args:
    items: (key, value) pairs in strictly increasing key order.

  Returns:
    The table's bytes.

  Raises:
    ValueError: If the keys are not strictly increasing.
  """
  out = []
  offset = 0
  index = _Block(1)
  block = _Block(_RESTART_INTERVAL)
  pending = None  # The handle of the last data block, awaiting its index key.
  last_key = None

  def flush(contents: bytes) -> bytes:
    nonlocal offset
    handle = _handle(offset, len(contents))
    trailer = b'\0' + struct.pack('<I', masked_crc32c(contents + b'\0'))
    out.append(contents + trailer)
    offset += len(contents) + _TRAILER_SIZE
    return handle

  for key, value in items:
    if last_key is not None and key <= last_key:
      raise ValueError(f'Table keys must increase: {key!r} after '
                       f'{last_key!r}.')
    if pending is not None:
      index.add(_shortest_separator(last_key, key), pending)
      pending = None
    block.add(key, value)
    last_key = key
    if block.size_estimate() >= _BLOCK_SIZE:
      pending = flush(block.finish())
      block = _Block(_RESTART_INTERVAL)
  if not block.empty:
    pending = flush(block.finish())
  if pending is not None:
    index.add(_short_successor(last_key), pending)
  metaindex = flush(_Block(_RESTART_INTERVAL).finish())
  index_handle = flush(index.finish())
  footer = (metaindex + index_handle).ljust(_FOOTER_SIZE - 8, b'\0')
  out.append(footer + struct.pack('<Q', _MAGIC))
  return b''.join(out)


def _read_block(data: bytes, handle: bytes, pos: int = 0
               ) -> Tuple[List[Tuple[bytes, bytes]], int]:
  """The entries of the block at `handle` (checksum verified)."""
  offset, pos = _read_varint(handle, pos)
  size, pos = _read_varint(handle, pos)
  contents = data[offset:offset + size]
  block_type, crc = struct.unpack_from('<BI', data, offset + size)
  if (len(contents) != size or block_type != 0 or
      crc != masked_crc32c(contents + b'\0')):
    raise ValueError(f'bad table block at offset {offset}')
  (restarts,) = struct.unpack_from('<I', contents, size - 4)
  end = size - 4 * (restarts + 1)
  entries = []
  key = b''
  at = 0
  while at < end:
    shared, at = _read_varint(contents, at)
    unshared, at = _read_varint(contents, at)
    length, at = _read_varint(contents, at)
    key = key[:shared] + contents[at:at + unshared]
    at += unshared
    entries.append((key, contents[at:at + length]))
    at += length
  return entries, pos


def read_table(data: bytes) -> List[Tuple[bytes, bytes]]:
  """The (key, value) pairs of a LevelDB table without compression.

  Raises:
    ValueError: If `data` is not such a table or a block checksum is wrong.
  """
  if (len(data) < _FOOTER_SIZE or
      struct.unpack_from('<Q', data, len(data) - 8)[0] != _MAGIC):
    raise ValueError('not a LevelDB table (no magic number)')
  footer = data[len(data) - _FOOTER_SIZE:]
  _, pos = _read_varint(footer, _read_varint(footer, 0)[1])  # Metaindex.
  index, _ = _read_block(data, footer, pos)
  items = []
  for _, handle in index:
    items.extend(_read_block(data, handle)[0])
  return items


def read_index(data: bytes
              ) -> Tuple[tensor_bundle_pb2.BundleHeaderProto,
                         Dict[str, tensor_bundle_pb2.BundleEntryProto]]:
  """The header and entries (by checkpoint key) of a bundle's index.

  Keys that are not UTF-8 (those of tensor slices) keep their bytes as
  surrogate escapes, which `write_index` writes back.
  """
  header = None
  entries = {}
  for key, value in read_table(data):
    if key == HEADER_KEY:
      header = tensor_bundle_pb2.BundleHeaderProto.FromString(value)
    else:
      entries[key.decode('utf-8', 'surrogateescape')] = (
          tensor_bundle_pb2.BundleEntryProto.FromString(value))
  if header is None:
    raise ValueError('not a tensor bundle index (no header)')
  return header, entries


def write_index(header: tensor_bundle_pb2.BundleHeaderProto,
                entries: Dict[str, tensor_bundle_pb2.BundleEntryProto]
               ) -> bytes:
  """A bundle index of `header` and `entries` (by checkpoint key)."""
  items = sorted((key.encode('utf-8', 'surrogateescape'),
                  entry.SerializeToString())
                 for key, entry in entries.items())
  return write_table(
      [(HEADER_KEY, header.SerializeToString())] + items)


def string_tensor_data(values: Sequence[bytes]) -> Tuple[bytes, int]:
  """A string tensor's bytes in a data shard, and their masked crc32c.

  The layout TensorFlow's bundle writer uses: every length as a varint64, a
  masked crc32c of the lengths (each taken as a little-endian uint32, or
  uint64 beyond 32 bits), then the strings.
  """
  crc = 0
  for value in values:
    width = '<I' if len(value) <= 0xffffffff else '<Q'
    crc = google_crc32c.extend(crc, struct.pack(width, len(value)))
  lengths_crc = struct.pack('<I', mask(crc))
  crc = google_crc32c.extend(crc, lengths_crc)
  for value in values:
    crc = google_crc32c.extend(crc, value)
  data = b''.join([_varint(len(v)) for v in values] + [lengths_crc, *values])
  return data, mask(crc)
