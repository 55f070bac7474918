"""A readable account of the eligibility traces a model keeps."""

from __future__ import annotations

import math

import jax
import numpy as np

# group of the e-prop trace pytree -> what its arrays are
KINDS = {
  'synapses': 'per-synapse',
  'presynaptic': 'presynaptic',
  'direct': 'per-neuron',
  'derived': 'derived coefficients',
  'rtrl': 'dense (RTRL)',
  'readout_filter': 'readout filter',
}


def describe_traces(eligibility) -> str:
  """Which trace each parameter keeps, its shape and its size.

  Args:
    eligibility: the ``'eligibility'`` collection of a model's state (from
      ``init``, `fe.rest_state` or ``apply``), or one layer's part of it.

  Returns:
    One line per trace: the layer's path, the parameter's path, the kind
    (``per-synapse`` ``(*batch, rows, in, features)``, ``presynaptic``
    ``(*batch, rows, in)``: the same for every post-neuron, ``per-neuron``
    ``(*batch, rows, features)``, ``derived coefficients``, ``dense
    (RTRL)``, or ``readout filter``: the state of ``readout_decay``'s
    filter, one per parameter and its previous filtered output), the shape
    and the bytes; then the total.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax_eprop as fe
    >>> layer = fe.OnlineGrad(fe.ALIF(256))
    >>> state = layer.init(jax.random.key(0), jnp.ones((32, 1, 700)))
    >>> print(fe.describe_traces(state['eligibility']))
    layer  parameter         kind                  shape              bytes
    -      input/kernel      per-synapse           (32, 1, 700, 256)  21.9 MiB
    -      recurrent/kernel  per-synapse           (32, 1, 256, 256)  8.0 MiB
    -      input/kernel      presynaptic           (32, 1, 700)       87.5 KiB
    -      recurrent/kernel  presynaptic           (32, 1, 256)       32.0 KiB
    -      derived           derived coefficients  (32, 1, 2, 256)    64.0 KiB
    total                                                             30.1 MiB
  """
  rows = []
  _collect(eligibility, (), rows)
  order = list(KINDS.values())
  rows.sort(key=lambda r: (r[0], order.index(r[2])))
  header = ('layer', 'parameter', 'kind', 'shape', 'bytes')
  table = [header] + [
    (layer, name, kind, str(shape), _bytes(size))
    for layer, name, kind, shape, size in rows
  ]
  total = sum(r[4] for r in rows)
  widths = [max(len(r[i]) for r in table) for i in range(4)]
  lines = [
    '  '.join(c.ljust(w) for c, w in zip(r[:4], widths)) + '  ' + r[4]
    for r in table
  ]
  pad = sum(widths) + 2 * len(widths)
  lines.append('total'.ljust(pad) + _bytes(total))
  return '\n'.join(line.rstrip() for line in lines)


def _collect(tree, path, rows) -> None:
  if not isinstance(tree, dict):
    return
  layer = '/'.join(path) or '-'
  if set(tree) & set(KINDS) and set(tree) <= set(KINDS):
    for group, value in tree.items():
      kind = KINDS[group]
      for name, leaf in _leaves(group, value):
        shape = tuple(np.shape(leaf))
        size = math.prod(shape) * jax.numpy.result_type(leaf).itemsize
        rows.append((layer, name, kind, shape, size))
    return
  for key, value in tree.items():
    _collect(value, (*path, str(key)), rows)


def _leaves(name: str, value) -> list:
  """``(name, array)`` pairs of a group, nested groups flattened."""
  if not isinstance(value, dict):
    return [(name, value)]
  return [pair for k, v in value.items() for pair in _leaves(k, v)]


def _bytes(n: int) -> str:
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= scale:
      return f'{n / scale:.1f} {unit}'
  return f'{n} B'
