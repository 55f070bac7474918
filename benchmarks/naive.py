"""Naive dense e-prop: the baseline that structured traces replace.

Every step takes per-example dense Jacobians of the cell step (``jax.jacfwd``
with the recurrent input stop-gradiented, as e-prop drops that path) and
propagates a dense eligibility trace ``eps: (batch, K * features, P)`` over
all ``P`` cell parameters::

  eps_t  = dh_t/dh_{t-1} eps_{t-1} + dh_t/dtheta
  grad  += ybar_t (dy_t/dh_{t-1} eps_{t-1} + dy_t/dtheta)

The gradient is the same e-prop gradient the library computes; the cost is
what a direct implementation of the definition pays.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from benchmarks.models import Problem, cross_entropy

RECURRENT = 'recurrent'


def _stop_recurrent(next_fun, args, kwargs, context):
  """Stops the gradient of the input of every synapse named ``recurrent``."""
  if context.module.name == RECURRENT and context.method_name == '__call__':
    args = jax.lax.stop_gradient(args)
  return next_fun(*args, **kwargs)


def naive_step(p: Problem) -> Callable:
  """``(params, state, xs, ys) -> (loss, grads, (carry, eps))``."""
  cell = p.net.cell
  carry0 = cell.initialize_carry(jax.random.key(0), p.xs[:, 0].shape)
  h0, unravel_h = ravel_pytree(jax.tree.map(lambda a: a[0], carry0))

  def one(theta, h, x, unravel_p):
    """One example's step on flat vectors: ``(h_new, y)``."""
    with nn.intercept_methods(_stop_recurrent):
      new, y = cell.apply({'params': unravel_p(theta)}, unravel_h(h), x)
    return ravel_pytree(new)[0], y

  def step(params, state, xs, ys):
    del state
    theta, unravel_p = ravel_pytree(params['cell'])
    batch = xs.shape[0]
    f = lambda th, h, x: one(th, h, x, unravel_p)
    jac = jax.vmap(jax.jacfwd(f, argnums=(0, 1)), in_axes=(None, 0, 0))
    run = jax.vmap(f, in_axes=(None, 0, 0))
    readout = params['readout']

    def out_loss(y, r, label):
      logits = y @ r['kernel'] + r['bias'][None]
      return jnp.sum(cross_entropy(logits, label)) / batch

    def body(c, inputs):
      h, eps, grad, r_grad, loss = c
      x, label = inputs
      (h_new, y) = run(theta, h, x)
      ((jt_h, jh_h), (jt_y, jh_y)) = jac(theta, h, x)
      value, (y_bar, r_bar) = jax.value_and_grad(out_loss, (0, 1))(
        y, readout, label
      )
      dy = jnp.einsum('byk,bkp->byp', jh_y, eps) + jt_y
      grad = grad + jnp.einsum('by,byp->p', y_bar, dy)
      eps = jnp.einsum('bjk,bkp->bjp', jh_h, eps) + jt_h
      r_grad = jax.tree.map(jnp.add, r_grad, r_bar)
      return (h_new, eps, grad, r_grad, loss + value), None

    h = jnp.broadcast_to(h0, (batch, h0.size))
    eps = jnp.zeros((batch, h0.size, theta.size), theta.dtype)
    zeros = jax.tree.map(jnp.zeros_like, readout)
    init = (h, eps, jnp.zeros_like(theta), zeros, jnp.zeros(()))
    (h, eps, grad, r_grad, loss), _ = jax.lax.scan(
      body, init, (jnp.swapaxes(xs, 0, 1), jnp.swapaxes(ys, 0, 1))
    )
    grads = {'cell': unravel_p(grad), 'readout': r_grad}
    return loss, grads, (h, eps)

  return step
