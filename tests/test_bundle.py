"""The bundle index writer against TensorFlow's own writer and readers."""

import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import tensor_bundle_pb2

from ckpt_export import bundle


def _index(prefix: str) -> bytes:
  with open(prefix + '.index', 'rb') as f:
    return f.read()


def _write_checkpoint(prefix: str, tensors: dict) -> None:
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                    shape_and_slices=[''] * len(names),
                    tensors=[tensors[n] for n in names])


@pytest.mark.parametrize('count', [3, 40, 5000])
def test_rewritten_index_is_byte_for_byte_tensorflows(tmp_path, count):
  # 5000 entries with long keys span two 256 KiB blocks; 40 span three
  # restart intervals.
  tensors = {f'layer_{i:05d}/' + 'k' * 40 + '/.ATTRIBUTES/VARIABLE_VALUE':
             tf.constant([i, i + 1], tf.float32) for i in range(count)}
  tensors['strings'] = tf.constant([b'a', b'', b'xyz' * 100])
  prefix = str(tmp_path / 'ckpt')
  _write_checkpoint(prefix, tensors)
  if count == 3:  # Sliced tensors have entries with binary keys too.
    variable = tf.Variable(tf.range(8.0))
    prefix = tf.train.Checkpoint(v=variable).write(
        prefix, options=tf.train.CheckpointOptions(
            experimental_sharding_callback=(
                tf.train.experimental.MaxShardSizePolicy(max_shard_size=8))))
    tensors = {name: None for name, _ in tf.train.list_variables(prefix)}
  data = _index(prefix)
  if count == 5000:
    assert len(data) > 256 * 1024
  header, entries = bundle.read_index(data)
  assert header.num_shards == (1 if count > 3 else 4)
  assert set(entries) >= set(tensors)
  assert bundle.write_index(header, entries) == data


def test_remapped_index_is_read_by_tensorflow(tmp_path):
  """An index with other keys over the same data reads the same values."""
  lookup = tf.lookup.experimental.MutableHashTable(tf.string, tf.int64, -1)
  lookup.insert(tf.constant(['a', 'bb']), tf.constant([1, 2], tf.int64))
  module = tf.Module()
  module.table = lookup
  module.words = tf.Variable([b'hello', b'', b'world'])
  module.big = tf.Variable(np.arange(70000, dtype=np.float64))
  module.many = [tf.Variable(float(i)) for i in range(300)]
  prefix = tf.train.Checkpoint(m=module).write(str(tmp_path / 'ckpt'))
  header, entries = bundle.read_index(_index(prefix))
  # Multi-tensor saveable: the table's keys and values under one prefix.
  assert {'m/table/.ATTRIBUTES/table-keys',
          'm/table/.ATTRIBUTES/table-values'} <= set(entries)
  renamed = {'renamed/' + key: entry for key, entry in entries.items()
             if key != '_CHECKPOINTABLE_OBJECT_GRAPH'}
  os.makedirs(tmp_path / 'copy')
  copy_prefix = str(tmp_path / 'copy' / 'ckpt')
  os.link(prefix + '.data-00000-of-00001',
          copy_prefix + '.data-00000-of-00001')
  with open(copy_prefix + '.index', 'wb') as f:
    f.write(bundle.write_index(header, renamed))
  reader = tf.train.load_checkpoint(copy_prefix)
  original = tf.train.load_checkpoint(prefix)
  assert sorted(name for name, _ in tf.train.list_variables(copy_prefix)) == (
      sorted(renamed))
  for key in renamed:
    got = reader.get_tensor(key)
    want = original.get_tensor(key[len('renamed/'):])
    np.testing.assert_array_equal(got, want)
  assert list(reader.get_tensor('renamed/m/words/.ATTRIBUTES/VARIABLE_VALUE')
             ) == [b'hello', b'', b'world']


def test_string_tensor_shard_is_read_by_tensorflow(tmp_path):
  values = [b'graph' * 1000, b'', b'\xff\x00']
  data, crc = bundle.string_tensor_data(values)
  prefix = str(tmp_path / 'strings')
  with open(prefix + '.data-00000-of-00001', 'wb') as f:
    f.write(data)
  entry = tensor_bundle_pb2.BundleEntryProto(
      dtype=tf.string.as_datatype_enum, shard_id=0, offset=0, size=len(data),
      crc32c=crc)
  entry.shape.dim.add(size=len(values))
  header = tensor_bundle_pb2.BundleHeaderProto(num_shards=1)
  with open(prefix + '.index', 'wb') as f:
    f.write(bundle.write_index(header, {'s': entry}))
  assert list(tf.train.load_checkpoint(prefix).get_tensor('s')) == values
  # The bytes TensorFlow writes for the same tensor.
  _write_checkpoint(str(tmp_path / 'tf'), {'s': tf.constant(values)})
  with open(str(tmp_path / 'tf') + '.data-00000-of-00001', 'rb') as f:
    assert f.read() == data


def test_corrupt_index_is_refused(tmp_path):
  prefix = str(tmp_path / 'ckpt')
  _write_checkpoint(prefix, {'a': tf.constant(1.0)})
  data = bytearray(_index(prefix))
  data[3] ^= 1
  with pytest.raises(ValueError, match='bad table block'):
    bundle.read_index(bytes(data))
  with pytest.raises(ValueError, match='magic'):
    bundle.read_index(b'x' * 60)


def test_keys_out_of_order_are_refused():
  with pytest.raises(ValueError, match="b'a' after b'b'"):
    bundle.write_table([(b'b', b''), (b'a', b'')])
