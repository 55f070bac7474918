"""Locality rules of the shape and indexing ops: where labelled axes go.

Each rule follows the neuron (``'n'``) and batch (``'b'``) axes through the
op, and refuses (`NonLocalError`) any size change, window or indexing along a
labelled axis: a shift built from ``pad`` and ``slice``, a
``dynamic_update_slice`` into zeros, a ``gather`` of other neurons. The
table that maps primitives to these rules is `flax_eprop.sparse.rules`.
"""

from __future__ import annotations

import math

from flax_eprop.sparse._jaxpr import Op
from flax_eprop.sparse.axes import (
  in_shape,
  labelled,
  merge,
  nonlocal_error,
  out_shape,
)


def broadcast_in_dim(op: Op, axes, body) -> list:
  a, shape = axes[0], op.params['shape']
  out = [None] * len(shape)
  old = in_shape(op, 0)
  for d, out_d in enumerate(op.params['broadcast_dimensions']):
    if old[d] == shape[out_d]:
      out[out_d] = a[d]
  return [tuple(out)]


def reshape(op: Op, axes, body) -> list:
  """A labelled axis must keep its size and its place in the flat order
  (the product of the sizes before it); merging or splitting it refuses."""
  a, old, new = axes[0], in_shape(op, 0), tuple(op.params['new_sizes'])
  out = [None] * len(new)
  for d, label in enumerate(a):
    if label is None:
      continue
    before = math.prod(old[:d])
    match = [
      e
      for e in range(len(new))
      if new[e] == old[d] and math.prod(new[:e]) == before
    ]
    if old[d] == 1:  # a size-1 axis mixes nothing: keep its label if it can
      match = [e for e in match if out[e] is None][-1:]
      if not match:
        continue
    if not match:
      raise nonlocal_error(
        op, f'merges or splits the neuron or batch axis ({old} -> {new})'
      )
    out[match[0]] = label
  return [tuple(out)]


def squeeze(op: Op, axes, body) -> list:
  dims = {d % len(axes[0]) for d in op.params['dimensions']}
  return [tuple(a for d, a in enumerate(axes[0]) if d not in dims)]


def transpose(op: Op, axes, body) -> list:
  return [tuple(axes[0][p] for p in op.params['permutation'])]


def stack(op: Op, axes, body) -> list:
  """``stack``: a new free axis at ``params['axis']``."""
  columns = list(zip(*axes))
  columns.insert(op.params['axis'] % (len(columns) + 1), ())
  return [merge(op, columns)]


def unstack(op: Op, axes, body) -> list:
  (a,) = axes
  d = op.params['axis'] % len(a)
  if a[d] is not None:
    raise nonlocal_error(op, 'splits the neuron or batch axis')
  return [a[:d] + a[d + 1 :]] * len(op.out_avals)


def tile(op: Op, axes, body) -> list:
  (a,) = axes
  reps = op.params['reps']
  if any(a[d] is not None and reps[d] != 1 for d in range(len(a))):
    raise nonlocal_error(op, 'repeats the neuron or batch axis')
  return [a]


def slice_(op: Op, axes, body) -> list:
  """A labelled axis must be taken whole (start 0, full limit, stride 1)."""
  (a,) = axes
  p, shape = op.params, in_shape(op, 0)
  strides = p['strides'] or (1,) * len(a)
  for d, label in enumerate(a):
    whole = (p['start_indices'][d], p['limit_indices'][d], strides[d]) == (
      0,
      shape[d],
      1,
    )
    if label is not None and not whole:
      raise nonlocal_error(op, 'slices the neuron or batch axis')
  return [a]


def pad(op: Op, axes, body) -> list:
  a = axes[0]
  for d, config in enumerate(op.params['padding_config']):
    if a[d] is not None and tuple(config) != (0, 0, 0):
      raise nonlocal_error(op, 'pads the neuron or batch axis')
  return [a]


def dynamic_slice(op: Op, axes, body) -> list:
  a, shape, sizes = axes[0], in_shape(op, 0), op.params['slice_sizes']
  if any(a[d] is not None and sizes[d] != shape[d] for d in range(len(a))):
    raise nonlocal_error(op, 'slices the neuron or batch axis')
  return [a]


def dynamic_update_slice(op: Op, axes, body) -> list:
  """The update must cover every labelled axis whole."""
  shape, update = in_shape(op, 0), in_shape(op, 1)
  columns = []
  for d in range(len(shape)):
    column = [axes[0][d], axes[1][d]]
    if update[d] != shape[d] and any(label is not None for label in column):
      raise nonlocal_error(op, 'updates part of the neuron or batch axis')
    columns.append(column)
  return [merge(op, columns)]


def gather(op: Op, axes, body) -> list:
  """Labelled operand axes must be taken whole (offset axes, full size)."""
  operand, indices = axes[0], axes[1]
  dn, sizes = op.params['dimension_numbers'], op.params['slice_sizes']
  shape = in_shape(op, 0)
  indexed = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
  indexed |= {d for d in dn.start_index_map if sizes[d] != shape[d]}
  if labelled(operand, indexed) or any(
    operand[d] is not None and sizes[d] != shape[d] for d in range(len(shape))
  ):
    raise nonlocal_error(op, 'indexes into the neuron or batch axis')
  kept = [
    d
    for d in range(len(shape))
    if d not in dn.collapsed_slice_dims and d not in dn.operand_batching_dims
  ]
  out = [None] * len(out_shape(op))
  for d, e in zip(kept, dn.offset_dims):
    out[e] = operand[d]
  batch = [e for e in range(len(out)) if e not in dn.offset_dims]
  for label, e in zip(indices[:-1], batch):
    out[e] = merge(op, [[out[e], label]])[0]
  return [tuple(out)]


def scatter(op: Op, axes, body) -> list:
  """Labelled axes must be window axes written whole by the updates."""
  operand, updates = axes[0], axes[2]
  dn = op.params['dimension_numbers']
  shape, u_shape = in_shape(op, 0), in_shape(op, 2)
  window = [
    d
    for d in range(len(shape))
    if d not in dn.inserted_window_dims and d not in dn.operand_batching_dims
  ]
  columns = [[label] for label in operand]
  for d, u in zip(window, dn.update_window_dims):
    if u_shape[u] != shape[d] and (
      operand[d] is not None or updates[u] is not None
    ):
      raise nonlocal_error(op, 'scatters into part of the neuron or batch axis')
    columns[d].append(updates[u])
  scattered = [u for u in range(len(u_shape)) if u not in dn.update_window_dims]
  if labelled(updates, scattered) or labelled(
    operand, [d for d in range(len(shape)) if d not in window]
  ):
    raise nonlocal_error(op, 'scatters along the neuron or batch axis')
  return [merge(op, columns)]
