"""Learning-signal options: random feedback (Bellec et al.'s "random e-prop").

By default the learning signal of a spiking layer is the reverse-mode
cotangent of its output, i.e. the readout error sent back through the
transposed readout weights (symmetric feedback). `RandomFeedback` wraps a
layer (typically the readout) so that its forward pass and its parameter
gradients are unchanged, but the cotangent it sends to its input uses a
fixed random matrix ``B`` instead of the layer's own Jacobian:
``x_bar = y_bar @ B.T``.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from flax_eprop.online.state import resting

FEEDBACK = 'feedback'


class RandomFeedback(nn.Module):
  """Sends the learning signal back through a fixed random matrix.

  The wrapped module maps ``x: (*batch, in)`` to ``y: (*batch, out)``, step
  by step (a ``Dense``, or a leaky readout ``fe.OnlineGrad(fe.LI(out))`` on
  ``x: (*batch, time, in)``: each step's input gets its own ``y_bar_t
  B^T``). The
  matrix ``B: (in, out)`` is drawn once at ``init`` (from the ``'params'``
  RNG) and stored in the ``'feedback'`` collection, so it is checkpointed
  with the model state and never trained.

  Attributes:
    module: the layer to wrap, e.g. ``nn.Dense(20)``.
    feedback_init: initializer of ``B`` (default: LeCun normal over
      ``out``, the scale of a readout's transposed kernel).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import flax_eprop as fe
    >>> readout = fe.RandomFeedback(nn.Dense(3))
    >>> x = jnp.ones((2, 5))
    >>> variables = readout.init(jax.random.key(0), x)
    >>> variables['feedback']['kernel'].shape  # B: (in, out)
    (5, 3)
    >>> x_bar = jax.grad(lambda x: readout.apply(variables, x).sum())(x)
    >>> bool(jnp.allclose(x_bar, jnp.ones((2, 3)) @ variables['feedback']['kernel'].T))
    True
  """

  module: nn.Module
  feedback_init: Callable = nn.initializers.lecun_normal(
    in_axis=-1, out_axis=-2
  )

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.is_initializing():
      y = self.module(x)
      shape = (x.shape[-1], y.shape[-1])
      rng = self.make_rng('params')
      self.variable(FEEDBACK, 'kernel', self.feedback_init, rng, shape, x.dtype)
      return y
    if not self.has_variable(FEEDBACK, 'kernel'):
      if resting():  # rest_state: only the layers' state is made
        return self.module(x)
      raise ValueError(
        f'RandomFeedback {self.name!r}: the {FEEDBACK!r} collection was not '
        "passed; pass the state from init: apply({'params': ..., **state})."
      )
    b = self.get_variable(FEEDBACK, 'kernel')
    if b.shape[0] != x.shape[-1]:
      raise ValueError(
        f'RandomFeedback {self.name!r}: input has {x.shape[-1]} features, '
        f'the feedback matrix expects {b.shape[0]}.'
      )
    return route_feedback(self.module, x, b)


def route_feedback(module: Callable, x: jax.Array, b: jax.Array) -> jax.Array:
  """``module(x)`` whose input cotangent is ``y_bar @ B^T``.

  ``y = module(sg(x)) + (x @ B - sg(x @ B))``: the added term is exactly
  zero and its derivative sends ``y_bar @ B^T`` to ``x``; the module's own
  parameters get their ordinary gradients. Plain autodiff, no custom VJP,
  so ``module`` may hold other modules (``fe.OnlineGrad(fe.LI(...))``: a
  leaky readout, one step per time step of ``x: (*batch, time, in)``).
  """
  y = module(jax.lax.stop_gradient(x))
  route = jnp.einsum(
    '...i,io->...o', x, jax.lax.stop_gradient(b).astype(x.dtype)
  )
  return y + (route - jax.lax.stop_gradient(route)).astype(y.dtype)
