"""The locality table (`flax_eprop.sparse.rules`), entry by entry.

In the style of JAX's ``lax_autodiff_test``: every entry of ``RULES`` has
cases below, each a small step ``new_v = body(v, tau, x) + x @ w`` that uses
the primitive on a non-neuron axis (or elementwise) and, where the primitive
acts along an axis, on the neuron or batch axis. A local case must be
accepted with ``.todense()`` equal to `jax.jacfwd` (the step has no recurrent
synapse, so no stop-gradient is needed); a mixing case must raise
`NonLocalError`. A table entry without a case fails `test_every_entry_has_a
_case`; a `jax.lax` primitive without an entry must be refused.
"""

from __future__ import annotations

import dataclasses
import re
import types
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close
from jax import lax
from jax.extend import core as jex_core

import flax_eprop as fe
from flax_eprop.sparse import rules
from flax_eprop.sparse.structure import make_plan

F, B, IN = 4, 3, 2
sg = lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class Case:
  """``body(v, tau, x) -> (*batch, F)`` using primitive ``prim``."""

  prim: str
  name: str
  body: Callable
  local: bool
  batch: tuple = (B,)


def make_step(body):
  def step(params, carry, x):
    (v,) = carry
    tau = params['tau'].reshape((1,) * (v.ndim - 1) + (F,))
    new = body(v, jnp.broadcast_to(tau, v.shape), x) + x @ params['w']
    return (new,), new

  return step


def setup(batch, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {
    'w': jax.random.normal(k[0], (IN, F), jnp.float64),
    'tau': jax.random.uniform(k[1], (F,), jnp.float64, 1.0, 2.0),
  }
  v = jax.random.normal(k[2], (*batch, F), jnp.float64)
  x = jax.random.normal(k[3], (*batch, IN), jnp.float64)
  return params, (v,), x


def primitives_of(fn, *args) -> set[str]:
  """Names of every primitive in ``fn``'s jaxpr, nested bodies included."""

  def walk(jaxpr, names):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else [value]:
          if isinstance(sub, jex_core.ClosedJaxpr):
            walk(sub.jaxpr, names)
          elif isinstance(sub, jex_core.Jaxpr):
            walk(sub, names)
    return names

  return walk(jax.make_jaxpr(fn)(*args).jaxpr, set())


def jacobians(step, params, carry, x):
  """``(sparse, reference)``: dense Jacobians w.r.t. (params, carry)."""

  @jax.jit
  def both(params, carry, x):
    jac = fe.sparse_jacfwd(step)(params, carry, x)
    ref = [jax.jacfwd(step, a)(params, carry, x) for a in (0, 1)]
    return [j.todense() for j in jac], ref

  return both(params, carry, x)


def refusal(case: Case) -> str | None:
  """The `NonLocalError` message for the case's step, or None if accepted.

  Only the structure pass runs: the numbers are checked by
  `test_local_cases_match_jacfwd`, several cases per compilation.
  """
  step = make_step(case.body)
  params, carry, x = setup(case.batch)
  try:
    make_plan(step, params, carry, x)
  except fe.NonLocalError as error:
    return str(error)
  return None


# Shared pieces of the cases.


def pair(v):
  """``(*batch, 2, F)``: a new free axis (-2) next to the neuron axis."""
  return jnp.stack([v, 0.5 * v * v], axis=-2)


def sq(v):
  return 1.0 + v * v  # positive


def unit(v):
  return 0.5 * jnp.tanh(v)  # in (-0.5, 0.5)


def flag(v):
  return (v > 0).astype(v.dtype)


def where(mask, v):
  return jnp.where(mask, v, 2.0 * v)


def ints(v):
  return (jnp.abs(v) * 7).astype(jnp.int32)


LATERAL = 0.3 * np.ones((F, F))  # a constant matrix over neurons


@jax.custom_jvp
def centred(v):
  """Mixes neurons in its primal (the JVP rule follows it)."""
  return v - v.mean(-1, keepdims=True)


@centred.defjvp
def _centred_jvp(primals, tangents):
  return centred(*primals), centred(*tangents)


@jax.custom_vjp
def vjp_square(v):
  return v * v


vjp_square.defvjp(lambda v: (v * v, v), lambda v, g: (2 * v * g,))


# Elementwise: one local case each (elementwise ops cannot mix).

UNARY = {
  'abs': jnp.abs,
  'acos': lambda v: jnp.arccos(unit(v)),
  'acosh': lambda v: jnp.arccosh(1.0 + sq(v)),
  'asin': lambda v: jnp.arcsin(unit(v)),
  'asinh': jnp.arcsinh,
  'atan': jnp.arctan,
  'atanh': lambda v: jnp.arctanh(unit(v)),
  'bessel_i0e': lax.bessel_i0e,
  'bessel_i1e': lax.bessel_i1e,
  'cbrt': lambda v: lax.cbrt(sq(v)),
  'ceil': lambda v: v * jnp.ceil(v),
  'clz': lambda v: where(lax.clz(ints(v)) > 28, v),
  'conj': lambda v: jnp.conj(lax.complex(v, v * v)).imag,
  'convert_element_type': lambda v: v.astype(jnp.float32).astype(v.dtype),
  'copy': lambda v: jnp.array(v, copy=True) * v,
  'cos': jnp.cos,
  'cosh': jnp.cosh,
  'digamma': lambda v: lax.digamma(sq(v)),
  'erf': lax.erf,
  'erf_inv': lambda v: lax.erf_inv(unit(v)),
  'erfc': lax.erfc,
  'exp': jnp.exp,
  'exp2': lax.exp2,
  'expm1': jnp.expm1,
  'floor': lambda v: v * jnp.floor(v),
  'imag': lambda v: lax.complex(v, 2.0 * v).imag,
  'integer_pow': lambda v: v**3,
  'is_finite': lambda v: where(jnp.isfinite(1.0 / v), v),
  'lgamma': lambda v: lax.lgamma(sq(v)),
  'log': lambda v: jnp.log(sq(v)),
  'log1p': lambda v: jnp.log1p(v * v),
  'logistic': jax.nn.sigmoid,
  'neg': lambda v: -v,
  'not': lambda v: where(jnp.logical_not(v > 0), v),
  'population_count': lambda v: where(lax.population_count(ints(v)) > 1, v),
  'real': lambda v: lax.complex(v, 2.0 * v).real,
  'reduce_precision': lambda v: lax.reduce_precision(v, 8, 23),
  'round': lambda v: v * jnp.round(v),
  'rsqrt': lambda v: lax.rsqrt(sq(v)),
  'sign': lambda v: v * jnp.sign(v),
  'sin': jnp.sin,
  'sinh': jnp.sinh,
  'sqrt': lambda v: jnp.sqrt(sq(v)),
  'square': jnp.square,
  'stop_gradient': lambda v: v - sg(v.mean(-1, keepdims=True)),
  'tan': lambda v: jnp.tan(unit(v)),
  'tanh': jnp.tanh,
}
BINARY = {
  'add': lambda v, t: v + t,
  'and': lambda v, t: where((v > 0) & (t > 1.5), v),
  'atan2': lambda v, t: jnp.arctan2(v, t),
  'clamp': lambda v, t: lax.clamp(-0.5, v, 0.5) + v,
  'complex': lambda v, t: jnp.abs(lax.complex(v, t)),
  'div': lambda v, t: v / t,
  'eq': lambda v, t: where(ints(v) == 1, v),
  'ge': lambda v, t: where(v >= t, v),
  'gt': lambda v, t: where(v > t, v),
  'igamma': lambda v, t: lax.igamma(t, sq(v)),
  'igammac': lambda v, t: lax.igammac(t, sq(v)),
  'le': lambda v, t: where(v <= t, v),
  'lt': lambda v, t: where(v < t, v),
  'max': lambda v, t: jnp.maximum(v, 0.5 * t),
  'min': lambda v, t: jnp.minimum(v, 0.5 * t),
  'mul': lambda v, t: v * t,
  'ne': lambda v, t: where(v != t, v) + v,
  # No derivative rule in JAX: used on values without a tangent.
  'nextafter': lambda v, t: lax.nextafter(sg(v), jnp.full_like(v, 2.0)) * v,
  'or': lambda v, t: where((v > 0) | (t > 1.5), v),
  'polygamma': lambda v, t: lax.polygamma(jnp.ones_like(v), sq(v)),
  'pow': lambda v, t: sq(v) ** t,
  'regularized_incomplete_beta': lambda v, t: lax.betainc(
    jnp.full_like(v, 2.0), jnp.full_like(v, 3.0), 0.5 + unit(v)
  ),
  'rem': lambda v, t: lax.rem(v, t),
  'select_n': lambda v, t: lax.select_n(v > 0, v, v * t),
  'shift_left': lambda v, t: where(
    lax.shift_left(ints(v), jnp.int32(1)) > 4, v
  ),
  'shift_right_arithmetic': lambda v, t: where(
    lax.shift_right_arithmetic(ints(v), jnp.int32(1)) > 1, v
  ),
  'shift_right_logical': lambda v, t: where(
    lax.shift_right_logical(ints(v), jnp.int32(1)) > 1, v
  ),
  'sub': lambda v, t: v - t,
  'xor': lambda v, t: where((v > 0) ^ (t > 1.5), v),
  'zeta': lambda v, t: lax.zeta(2.0 + sq(sg(v)), jnp.full_like(v, 1.5)) * v,
}

CASES = [
  Case(p, 'elementwise', lambda v, t, x, f=f: f(v), True)
  for p, f in UNARY.items()
]
CASES += [
  Case(p, 'elementwise', lambda v, t, x, f=f: f(v, t), True)
  for p, f in BINARY.items()
]

# Axis-aware rules: the free axis (-2 of ``pair``) is accepted, the neuron
# (-1) and batch (0) axes are refused.

CASES += [
  Case('optimization_barrier', 'identity', lambda v, t, x: lax.optimization_barrier(v) * v, True),
  Case('device_put', 'identity', lambda v, t, x: jax.device_put(v) * v, True),
  Case('sharding_constraint', 'identity', lambda v, t, x: lax.with_sharding_constraint(v, jax.sharding.SingleDeviceSharding(jax.devices()[0])) * v, True),
  Case('iota', 'constant', lambda v, t, x: lax.broadcasted_iota(v.dtype, v.shape, v.ndim - 1) * v, True),
  Case('reduce_sum', 'free', lambda v, t, x: pair(v).sum(-2), True),
  Case('reduce_sum', 'neuron', lambda v, t, x: v - v.mean(-1, keepdims=True), False),
  Case('reduce_sum', 'batch', lambda v, t, x: v - v.mean(0, keepdims=True), False),
  Case('reduce_max', 'free', lambda v, t, x: pair(v).max(-2), True),
  Case('reduce_max', 'neuron', lambda v, t, x: v - v.max(-1, keepdims=True), False),
  Case('reduce_min', 'free', lambda v, t, x: pair(v).min(-2), True),
  Case('reduce_min', 'neuron', lambda v, t, x: v - v.min(-1, keepdims=True), False),
  Case('reduce_prod', 'free', lambda v, t, x: pair(v).prod(-2), True),
  Case('reduce_prod', 'neuron', lambda v, t, x: v * v.prod(-1, keepdims=True), False),
  Case('reduce_and', 'free', lambda v, t, x: where(jnp.all(pair(v) > 0, -2), v), True),
  # Boolean and integer results carry no derivative: accepted anywhere.
  Case('reduce_or', 'neuron', lambda v, t, x: where(jnp.any(v > 0, -1, keepdims=True), v), True),
  Case('reduce_xor', 'free', lambda v, t, x: where(lax.reduce_xor_p.bind(pair(v) > 0, axes=(v.ndim - 1,)), v), True),
  Case('argmax', 'neuron', lambda v, t, x: where(jnp.argmax(v, -1, keepdims=True) == 0, v), True),
  Case('argmax', 'gather', lambda v, t, x: jnp.take_along_axis(v, jnp.argmax(v, -1, keepdims=True), -1) + v, False),
  Case('argmin', 'free', lambda v, t, x: where(jnp.argmin(pair(v), -2) == 0, v), True),
  Case('reduce', 'free', lambda v, t, x: lax.reduce((pair(v), pair(v)), (0.0, 1.0), lambda a, b: (a[0] + b[0], a[1] * b[1]), (v.ndim - 1,))[1], True),
  Case('reduce', 'neuron', lambda v, t, x: v + lax.reduce((v, v), (0.0, 1.0), lambda a, b: (a[0] + b[0], a[1] * b[1]), (v.ndim - 1,))[0][..., None], False),
  Case('cumsum', 'free', lambda v, t, x: jnp.cumsum(pair(v), -2)[..., 1, :], True),
  Case('cumsum', 'neuron', lambda v, t, x: jnp.cumsum(v, -1), False),
  Case('cumprod', 'free', lambda v, t, x: jnp.cumprod(pair(v), -2)[..., 1, :], True),
  Case('cumprod', 'neuron', lambda v, t, x: jnp.cumprod(v, -1), False),
  Case('cummax', 'free', lambda v, t, x: lax.cummax(pair(v), v.ndim - 1)[..., 1, :], True),
  Case('cummax', 'batch', lambda v, t, x: lax.cummax(v, 0), False),
  Case('cummin', 'free', lambda v, t, x: lax.cummin(pair(v), v.ndim - 1)[..., 1, :], True),
  Case('cummin', 'neuron', lambda v, t, x: lax.cummin(v, v.ndim - 1), False),
  Case('cumlogsumexp', 'free', lambda v, t, x: lax.cumlogsumexp(pair(v), v.ndim - 1)[..., 1, :], True),
  Case('cumlogsumexp', 'neuron', lambda v, t, x: lax.cumlogsumexp(v, v.ndim - 1), False),
  Case('sort', 'free', lambda v, t, x: jnp.sort(pair(v), -2)[..., 0, :], True),
  Case('sort', 'neuron', lambda v, t, x: jnp.sort(v, -1), False),
  Case('sort', 'parameter', lambda v, t, x: v * jnp.sort(t), False),
  Case('concatenate', 'free', lambda v, t, x: jnp.concatenate([pair(v), v[..., None, :]], -2).sum(-2), True),
  Case('concatenate', 'neuron', lambda v, t, x: jnp.concatenate([v, v], -1)[..., :F], False),
  Case('rev', 'free', lambda v, t, x: jnp.flip(pair(v), -2)[..., 0, :], True),
  Case('rev', 'neuron', lambda v, t, x: jnp.flip(v, -1), False),
  Case('split', 'free', lambda v, t, x: sum(a[..., 0, :] for a in jnp.split(pair(v), 2, -2)), True),
  Case('split', 'neuron', lambda v, t, x: jnp.concatenate(jnp.split(v, [1], -1)[::-1], -1), False),
  Case('approx_top_k', 'free', lambda v, t, x: lax.approx_max_k(jnp.swapaxes(pair(v), -1, -2), 1)[0][..., 0], True),
  Case('approx_top_k', 'neuron', lambda v, t, x: lax.approx_max_k(v, F)[0], False),
  Case('top_k', 'free', lambda v, t, x: lax.top_k(jnp.swapaxes(pair(v), -1, -2), 1)[0][..., 0], True),
  Case('top_k', 'neuron', lambda v, t, x: lax.top_k(v, F)[0], False),
  Case('fft', 'free', lambda v, t, x: jnp.fft.fft(jnp.swapaxes(pair(v), -1, -2), axis=-1).real[..., 0], True),
  Case('fft', 'neuron', lambda v, t, x: jnp.fft.irfft(jnp.fft.rfft(v) * jnp.array([[1.0, 0.5, 0.0]]), n=F), False),
  Case('reduce_window_sum', 'free', lambda v, t, x: lax.reduce_window(pair(v), 0.0, lax.add, (1, 2, 1), (1, 1, 1), 'VALID')[..., 0, :], True),
  Case('reduce_window_sum', 'neuron', lambda v, t, x: lax.reduce_window(v, 0.0, lax.add, (1, 3), (1, 1), 'SAME'), False),
  Case('reduce_window_max', 'free', lambda v, t, x: lax.reduce_window(pair(v), -jnp.inf, lax.max, (1, 2, 1), (1, 1, 1), 'VALID')[..., 0, :], True),
  Case('reduce_window_max', 'batch', lambda v, t, x: lax.reduce_window(v, -jnp.inf, lax.max, (2, 1), (1, 1), 'SAME'), False),
  Case('reduce_window_min', 'free', lambda v, t, x: lax.reduce_window(pair(v), jnp.inf, lax.min, (1, 2, 1), (1, 1, 1), 'VALID')[..., 0, :], True),
  Case('reduce_window_min', 'neuron', lambda v, t, x: lax.reduce_window(v, jnp.inf, lax.min, (1, 3), (1, 1), 'SAME'), False),
  Case('conv_general_dilated', 'free', lambda v, t, x: lax.conv_general_dilated(jnp.swapaxes(pair(v), 0, 1)[:, None, :], jnp.array([[[0.5, 2.0]]]), (1,), 'VALID')[:, 0, 0], True, ()),
  Case('conv_general_dilated', 'neuron', lambda v, t, x: jnp.convolve(v, jnp.array([0.5, 1.0, 0.5]), 'same'), False, ()),
  Case('broadcast_in_dim', 'free', lambda v, t, x: (v[..., None, :] * jnp.ones((1, 2, 1))).sum(-2), True),
  Case('broadcast_in_dim', 'moved', lambda v, t, x: lax.broadcast_in_dim(v, (B, F, 2), (0, 1))[..., 0], True),
  Case('reshape', 'stack_sum', lambda v, t, x: pair(v).reshape(B, 2, 1, F).sum((1, 2)), True),
  Case('reshape', 'split_neurons', lambda v, t, x: v.reshape(B, 2, F // 2)[:, ::-1].reshape(B, F), False),
  Case('reshape', 'merge_batch', lambda v, t, x: v.reshape(B * F)[::-1].reshape(B, F), False),
  Case('reshape', 'parameter', lambda v, t, x: v * t.reshape(B, 2, F // 2).transpose(0, 2, 1).reshape(B, F), False),
  Case('squeeze', 'free', lambda v, t, x: v[..., None, :][..., 0, :] * v, True),
  Case('transpose', 'free', lambda v, t, x: jnp.swapaxes(pair(v), -1, -2)[..., 1], True),
  Case('transpose', 'neuron', lambda v, t, x: (v[:, None, :] * jnp.ones((1, F, 1))).transpose(0, 2, 1)[:, 0, :], False),
  Case('stack', 'free', lambda v, t, x: jnp.stack([v, v * t]).sum(0), True),
  Case('unstack', 'free', lambda v, t, x: jnp.unstack(pair(v), axis=-2)[1], True),
  Case('unstack', 'neuron', lambda v, t, x: jnp.stack(jnp.unstack(v, axis=-1)[::-1], -1), False),
  Case('tile', 'free', lambda v, t, x: jnp.tile(v[..., None, :], (1, 2, 1)).sum(-2), True),
  Case('tile', 'neuron', lambda v, t, x: jnp.tile(v, (1, 2))[..., 1 : F + 1], False),
  Case('slice', 'free', lambda v, t, x: pair(v)[..., 1, :], True),
  Case('slice', 'neuron', lambda v, t, x: jnp.concatenate([v[..., 1:], v[..., :1]], -1), False),
  Case('slice', 'roll', lambda v, t, x: jnp.roll(v, 1, -1), False),
  Case('pad', 'free', lambda v, t, x: jnp.pad(pair(v), ((0, 0), (1, 0), (0, 0))).sum(-2), True),
  Case('pad', 'neuron', lambda v, t, x: jnp.pad(v, ((0, 0), (1, 0)))[..., :F], False),
  Case('dynamic_slice', 'free', lambda v, t, x: lax.dynamic_slice_in_dim(pair(v), (x[0, 0] > 0).astype(int), 1, 1)[..., 0, :], True),
  Case('dynamic_slice', 'neuron', lambda v, t, x: jnp.pad(lax.dynamic_slice_in_dim(v, 0, F - 1, 1), ((0, 0), (1, 0))), False),
  Case('dynamic_update_slice', 'free', lambda v, t, x: lax.dynamic_update_slice_in_dim(pair(v), (3 * v)[..., None, :], 1, 1).sum(-2), True),
  Case('dynamic_update_slice', 'shift', lambda v, t, x: lax.dynamic_update_slice(jnp.zeros((B, F + 1)), v, (0, 1))[..., :F], False),
  Case('gather', 'free', lambda v, t, x: jnp.take(pair(v), jnp.array([1, 0]), axis=-2).sum(-2) * v, True),
  Case('gather', 'neuron', lambda v, t, x: jnp.take(v, jnp.array([1, 0, 3, 2]), axis=-1), False),
  Case('gather', 'batch', lambda v, t, x: v[jnp.array([1, 0, 2])], False),
  Case('scatter', 'free', lambda v, t, x: pair(v).at[..., 0, :].set(3 * v).sum(-2), True),
  Case('scatter', 'neuron', lambda v, t, x: v.at[..., 0].set(v[..., 1]), False),
  Case('scatter-add', 'free', lambda v, t, x: pair(v).at[..., 0, :].add(v).sum(-2), True),
  Case('scatter-add', 'neuron', lambda v, t, x: jnp.zeros_like(v).at[..., jnp.array([1, 0, 3, 2])].add(v), False),
  Case('scatter-mul', 'free', lambda v, t, x: pair(v).at[..., 0, :].multiply(v).sum(-2), True),
  Case('scatter-min', 'free', lambda v, t, x: pair(v).at[..., 0, :].min(v * t).sum(-2), True),
  Case('scatter-max', 'free', lambda v, t, x: pair(v).at[..., 0, :].max(v * t).sum(-2), True),
  Case('scatter-sub', 'free', lambda v, t, x: lax.scatter_sub(pair(v), jnp.zeros((1,), int), v[..., None, :], lax.ScatterDimensionNumbers((0, 1, 2), (), (1,))).sum(-2), True),
  Case('scatter-sub', 'batch', lambda v, t, x: lax.scatter_sub(v, jnp.zeros((1,), int), v[:1], lax.ScatterDimensionNumbers((0, 1), (), (0,))), False),
  Case('dot_general', 'free', lambda v, t, x: jnp.einsum('ck,...kn->...cn', jnp.array([[0.8, 0.1], [0.2, 0.7]]), pair(v)).sum(-2), True),
  Case('dot_general', 'neuron', lambda v, t, x: v @ LATERAL, False),
  Case('jit', 'local', lambda v, t, x: jax.jit(lambda v: v * jnp.tanh(v))(v), True),
  Case('jit', 'neuron', lambda v, t, x: jax.jit(lambda v: v - v.mean(-1, keepdims=True))(v), False),
  Case('remat2', 'local', lambda v, t, x: jax.checkpoint(lambda v: jnp.sin(v) * v)(v), True),
  Case('remat2', 'neuron', lambda v, t, x: jax.checkpoint(lambda v: jnp.roll(v, 1, -1))(v), False),
  Case('custom_jvp_call', 'local', lambda v, t, x: fe.surrogates.triangle(v - 0.2) + v, True),
  Case('custom_jvp_call', 'neuron', lambda v, t, x: centred(v), False),
  Case('custom_vjp_call', 'always', lambda v, t, x: vjp_square(v), False),
  Case('cond', 'local', lambda v, t, x: lax.cond(x.sum() > 0, lambda v: v * t, lambda v: -jnp.sin(v), v), True),
  Case('cond', 'neuron', lambda v, t, x: lax.cond(x.sum() > 0, lambda v: v, lambda v: jnp.roll(v, 1, -1), v), False),
  Case('while', 'local', lambda v, t, x: lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, 0.9 * c[1] + 0.1 * jnp.tanh(c[1])), (0, v))[1], True),
  Case('while', 'neuron', lambda v, t, x: lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.roll(c[1], 1, -1)), (0, v))[1], False),
  Case('scan', 'local', lambda v, t, x: lax.scan(lambda c, s: (0.9 * c + jnp.sin(c) * s, c), v, jnp.array([1.0, 2.0]))[0], True),
  Case('scan', 'free_xs', lambda v, t, x: lax.scan(lambda c, s: (c + s * c, c), v, jnp.moveaxis(pair(v), -2, 0))[0], True),
  Case('scan', 'neuron_xs', lambda v, t, x: lax.scan(lambda c, s: (c + s, c), jnp.zeros(B), v.T)[1].T, False),
  Case('scan', 'moves_carry', lambda v, t, x: lax.scan(lambda c, s: (c[::-1].T.reshape(B, F), s), v, None, length=2)[0], False),
]  # fmt: skip

IDS = [f'{c.prim}-{c.name}' for c in CASES]


def test_every_entry_has_a_case():
  covered = {c.prim for c in CASES}
  assert set(rules.RULES) - covered == set(), 'table entries without a case'
  assert covered - set(rules.RULES) == set(), 'cases of unknown entries'


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_rule(x64, case):
  step = make_step(case.body)
  params, carry, x = setup(case.batch)
  used = primitives_of(step, params, carry, x)
  assert case.prim in used, f'the case does not use `{case.prim}`: {used}'
  message = refusal(case)
  if case.local:
    assert message is None, message
    return
  assert message is not None, 'a step that mixes neurons was accepted'
  # The user's line (this file), also for ops inside jax.numpy helpers.
  assert re.match(r'.*test_sparse_rules\.py:\d+ \(.*\): ', message), message
  assert "mode='exact'" in message or 'custom_jvp' in message


def _groups(size: int = 12) -> list:
  local = [c for c in CASES if c.local]
  groups = []
  for batch in sorted({c.batch for c in local}):
    same = [c for c in local if c.batch == batch]
    groups += [same[i : i + size] for i in range(0, len(same), size)]
  return groups


@pytest.mark.parametrize(
  'group', _groups(), ids=lambda g: f'{g[0].prim}..{g[-1].prim}'
)
def test_local_cases_match_jacfwd(x64, group):
  """Accepted steps: ``.todense()`` equals `jax.jacfwd` (w.r.t. params and
  carry). The cases of a group are summed into one step (one compile);
  with random states a wrong case does not cancel out."""
  body = lambda v, t, x: sum(c.body(v, t, x) for c in group)
  step = make_step(body)
  params, carry, x = setup(group[0].batch, seed=1)
  actual, expected = jacobians(step, params, carry, x)
  assert_trees_close(actual, expected)
  assert any(bool(jnp.any(d != 0)) for d in jax.tree.leaves(expected[1]))


def _lax_primitives() -> list:
  found = {
    p.name: p for p in vars(lax).values() if isinstance(p, jex_core.Primitive)
  }
  return sorted(found.values(), key=lambda p: p.name)


@pytest.mark.parametrize(
  'prim',
  [p for p in _lax_primitives() if p.name not in rules.RULES],
  ids=lambda p: p.name,
)
def test_unknown_lax_primitive_is_refused(prim):
  """Every `jax.lax` primitive without an entry is refused by name."""
  op = types.SimpleNamespace(name=prim.name, params={}, where='cell.py:7 (f)')
  with pytest.raises(fe.NonLocalError, match=rf'cell\.py:7.*`{prim.name}`'):
    rules.out_axes(op, [('b', 'n')], None)


def test_lax_sweep_covers_the_table():
  """The sweep is not vacuous: most lax primitives have entries."""
  names = {p.name for p in _lax_primitives()}
  assert len(names & set(rules.RULES)) > 100
