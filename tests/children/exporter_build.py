"""Build functions for the decoupled exporter's tests (`module:function`)."""

import tensorflow as tf

from helpers import Scale


def build():
  """The exporter's side of a trainer saving `Checkpoint(module=...)`."""
  scale = Scale()
  return tf.train.Checkpoint(module=scale), {'scale': scale}


def build_other_names():
  """A checkpoint that does not match the trainer's (`net` for `module`)."""
  scale = Scale()
  return tf.train.Checkpoint(net=scale), {'scale': scale}


NOT_CALLABLE = 3
