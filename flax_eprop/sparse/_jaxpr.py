"""The only module that reads jaxprs: tracing, inlining and re-evaluation.

`jax.extend` has no compatibility promise, so every use of it (and every
primitive name we rely on) lives here. The rest of `flax_eprop.sparse` sees a
flat list of `Op` records over integer value ids.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import sysconfig
from typing import Any, Callable, Sequence

import jax
from jax.extend import core as jex_core
from jax.extend import source_info_util

# Call-like primitives whose body is inlined into the flat program: nested
# `jax.jit`, `jax.checkpoint` and closed calls are transparent to the analysis.
_INLINED = {
  'jit': 'jaxpr',
  'pjit': 'jaxpr',
  'closed_call': 'call_jaxpr',
  'core_call': 'call_jaxpr',
  'remat2': 'jaxpr',
  'checkpoint': 'jaxpr',
}
# Frames in these packages (and the standard library) are never the line of a
# user's cell that an error should point to, e.g. Flax's Dense.__call__.
_LIBRARIES = ('jax', 'jaxlib', 'flax', 'optax', 'equinox')


@dataclasses.dataclass(frozen=True)
class Const:
  """A literal operand of an `Op`."""

  value: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
  """One primitive application of the flattened program.

  Attributes:
    prim: the JAX primitive.
    params: its parameters (as in the jaxpr equation).
    ins: operand ids (`int`) or `Const` literals.
    outs: result ids.
    in_avals: abstract values (shape, dtype) of the operands.
    out_avals: abstract values of the results.
    where: ``file:line (function)`` of the user code that emitted it.
    ctx: the equation's context (re-entered when the op is evaluated).
  """

  prim: Any
  params: dict
  ins: tuple
  outs: tuple
  in_avals: tuple
  out_avals: tuple
  where: str
  ctx: Any

  @property
  def name(self) -> str:
    return self.prim.name


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
  """A jaxpr flattened into a list of ops over integer ids."""

  ops: tuple[Op, ...]
  invars: tuple[int, ...]
  outvars: tuple  # ids or Const
  consts: dict[int, Any]


def trace(fn: Callable, *args) -> tuple[Program, Any, list]:
  """Traces `fn(*args)`: its flat program, output treedef and output shapes."""
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  leaves, treedef = jax.tree.flatten(out_shape)
  return flatten(closed), treedef, leaves


def flatten(closed, where: str = '') -> Program:
  """Inlines nested calls of a `ClosedJaxpr` into one flat `Program`.

  Args:
    closed: a `ClosedJaxpr` or `Jaxpr`.
    where: the source line of the equation that called ``closed``, if any.
      An op whose own traceback has no frame outside JAX and Flax (one
      emitted inside a jitted jax.numpy helper such as ``jnp.roll``) reports
      the innermost enclosing call's line instead, so an error always names
      the user's line.
  """
  counter = iter(range(1 << 62))
  ops: list[Op] = []
  consts: dict[int, Any] = {}

  def new_id(_):
    return next(counter)

  def walk(jaxpr, const_ids, in_ids, outer):
    env = dict(zip(jaxpr.constvars, const_ids))
    env.update(zip(jaxpr.invars, in_ids))

    def read(atom):
      if isinstance(atom, jex_core.Literal):
        return Const(atom.val)
      return env[atom]

    for eqn in jaxpr.eqns:
      ins = tuple(read(a) for a in eqn.invars)
      key = _INLINED.get(eqn.primitive.name)
      here = _where(eqn.source_info, outer)
      if key is not None:
        sub = eqn.params[key]
        sub_jaxpr, sub_consts = _open(sub)
        sub_const_ids = [_const_id(c) for c in sub_consts]
        outs = walk(sub_jaxpr, sub_const_ids, ins, here)
        env.update(zip(eqn.outvars, outs))
        continue
      outs = tuple(new_id(v) for v in eqn.outvars)
      env.update(zip(eqn.outvars, outs))
      ops.append(
        Op(
          prim=eqn.primitive,
          params=dict(eqn.params),
          ins=ins,
          outs=outs,
          in_avals=tuple(_aval(a) for a in eqn.invars),
          out_avals=tuple(v.aval for v in eqn.outvars),
          where=here,
          ctx=eqn.ctx,
        )
      )
    return tuple(read(a) for a in jaxpr.outvars)

  def _const_id(value):
    i = next(counter)
    consts[i] = value
    return i

  jaxpr, top_consts = _open(closed)
  const_ids = [_const_id(c) for c in top_consts]
  invars = tuple(new_id(v) for v in jaxpr.invars)
  outvars = walk(jaxpr, const_ids, invars, where)
  return Program(tuple(ops), invars, outvars, consts)


@functools.lru_cache(maxsize=None)
def _library_dirs() -> tuple[str, ...]:
  dirs = [sysconfig.get_paths()['stdlib']]
  for name in _LIBRARIES:
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
      dirs.extend(spec.submodule_search_locations)
  return tuple(os.path.join(os.path.realpath(d), '') for d in dirs)


def _where(source_info, fallback: str = '') -> str:
  """``file:line (function)`` of the innermost frame outside the libraries,
  else ``fallback`` (the line of the enclosing call)."""
  traceback = source_info.traceback
  libraries = _library_dirs()
  for frame in traceback.frames if traceback is not None else ():
    if not os.path.realpath(frame.file_name).startswith(libraries):
      return f'{frame.file_name}:{frame.line_num} ({frame.function_name})'
  return fallback or source_info_util.summarize(source_info)


def _open(jaxpr):
  if isinstance(jaxpr, jex_core.ClosedJaxpr):
    return jaxpr.jaxpr, jaxpr.consts
  return jaxpr, ()


def out_avals(jaxpr) -> list:
  """The abstract values of a (closed) jaxpr's results."""
  jaxpr, _ = _open(jaxpr)
  return [_aval(a) for a in jaxpr.outvars]


def _aval(atom):
  return atom.aval


def bind(op: Op, values: Sequence[Any]) -> list[Any]:
  """Applies `op` to concrete or traced `values`; always returns a list."""
  params = op.prim.get_bind_params(op.params)
  with op.ctx.manager:
    out = op.prim.bind(*values, **params)
  return list(out) if op.prim.multiple_results else [out]


def evaluate(
  program: Program,
  args: Sequence[Any],
  rule: Callable[[Op, list[Any]], list[Any] | None] | None = None,
) -> list[Any]:
  """Evaluates `program` on `args`, letting `rule(op, values)` override ops.

  `rule` returns the op's results, or ``None`` to apply the op unchanged.
  Works under any JAX transformation (it only calls `Primitive.bind`).
  """
  env = dict(program.consts)
  env.update(zip(program.invars, args))

  def read(atom):
    return atom.value if isinstance(atom, Const) else env[atom]

  for op in program.ops:
    values = [read(a) for a in op.ins]
    out = rule(op, values) if rule is not None else None
    if out is None:
      out = bind(op, values)
    env.update(zip(op.outs, out))
  return [read(a) for a in program.outvars]
