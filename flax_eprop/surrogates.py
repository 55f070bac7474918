"""Surrogate spike functions: Heaviside forward, smooth pseudo-derivative.

Every function here takes a *normalised* distance to threshold

    x = (v - A) / threshold

and returns the spike ``H(x) = (x > 0)`` in ``x``'s dtype. Its derivative is
replaced by a pseudo-derivative ``sigma'(x)`` through :func:`jax.custom_jvp`,
so the surrogate works under :func:`jax.jvp`, :func:`jax.jacfwd`,
:func:`jax.grad` and :func:`jax.vmap` alike (a ``custom_vjp`` would break the
forward-mode e-prop transform). Cells compute ``z = spike_fn((v - A) /
threshold)``, so by the chain rule ``psi = dz/dv = sigma'(x) / threshold``.

The slope parameter of each function is a ``nondiff_argnums`` argument: it
must be a Python number, not a traced array. Pass a non-default value to a
cell with :func:`functools.partial`::

  cell = fe.LIF(64, spike_fn=functools.partial(fe.surrogates.fast_sigmoid,
                                               slope=25.))

A custom surrogate is any function ``x -> z`` written the same way.
"""

import math

import jax
import jax.numpy as jnp

__all__ = ['arctan', 'fast_sigmoid', 'heaviside', 'triangle']


def heaviside(x: jax.Array) -> jax.Array:
  """The spike nonlinearity ``H(x) = 1 if x > 0 else 0`` in ``x``'s dtype.

  Plain JAX: its derivative is zero everywhere. The surrogates below share
  this forward pass.

  Args:
    x: (*shape) floating array.

  Returns:
    (*shape) array of zeros and ones, same dtype as ``x``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax_eprop import surrogates
    >>> surrogates.heaviside(jnp.array([-1., 0., 0.5]))
    Array([0., 0., 1.], dtype=float32)
  """
  x = jnp.asarray(x)
  return (x > 0).astype(x.dtype)


def _surrogate(pseudo_derivative):
  """Makes a spike function: forward ``H(x)``, derivative
  ``pseudo_derivative(x, slope)`` by `jax.custom_jvp`.

  The decorated function supplies the name, signature (``(x, slope=...)``,
  the slope a ``nondiff_argnums`` Python number) and docstring.
  """

  def wrap(fn):
    spike = jax.custom_jvp(fn, nondiff_argnums=(1,))

    @spike.defjvp
    def _jvp(slope, primals, tangents):
      (x,), (x_dot,) = primals, tangents
      return heaviside(x), pseudo_derivative(x, slope) * x_dot

    return spike  # custom_jvp keeps fn's name, signature and docstring

  return wrap


@_surrogate(lambda x, d: d * jnp.maximum(0.0, 1.0 - jnp.abs(x)))
def triangle(x: jax.Array, dampening: float = 0.3) -> jax.Array:
  """Bellec's triangle surrogate (Bellec et al. 2020, the e-prop default).

  Forward ``H(x)``; pseudo-derivative

      sigma'(x) = dampening * max(0, 1 - |x|)

  Args:
    x: (*shape) normalised distance to threshold ``(v - A) / threshold``.
    dampening: peak of the pseudo-derivative (Python float; default 0.3).

  Returns:
    (*shape) spikes in ``x``'s dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax_eprop import surrogates
    >>> x = jnp.array([-0.5, 0.5, 2.0])
    >>> surrogates.triangle(x)
    Array([0., 1., 1.], dtype=float32)
    >>> jax.vmap(jax.grad(surrogates.triangle))(x)
    Array([0.15, 0.15, 0.  ], dtype=float32)
  """
  return heaviside(x)


@_surrogate(lambda x, slope: 1.0 / jnp.square(slope * jnp.abs(x) + 1.0))
def fast_sigmoid(x: jax.Array, slope: float = 10.0) -> jax.Array:
  """SuperSpike's fast-sigmoid surrogate (Zenke & Ganguli 2018).

  Forward ``H(x)``; pseudo-derivative, normalised to peak 1 at ``x = 0``
  (its integral is ``2 / slope``):

      sigma'(x) = 1 / (slope * |x| + 1)**2

  Args:
    x: (*shape) normalised distance to threshold ``(v - A) / threshold``.
    slope: steepness in units of ``1 / threshold`` (Python float; default 10).

  Returns:
    (*shape) spikes in ``x``'s dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax_eprop import surrogates
    >>> jax.vmap(jax.grad(surrogates.fast_sigmoid))(jnp.array([0., 0.1]))
    Array([1.  , 0.25], dtype=float32)
  """
  return heaviside(x)


@_surrogate(
  lambda x, alpha: (alpha / 2.0) / (1.0 + jnp.square(math.pi / 2.0 * alpha * x))
)
def arctan(x: jax.Array, alpha: float = 2.0) -> jax.Array:
  """Arctan surrogate (Fang et al. 2021, SpikingJelly's ``ATan``).

  Forward ``H(x)``; pseudo-derivative, the derivative of
  ``arctan(pi / 2 * alpha * x) / pi + 1 / 2`` (integral 1, peak
  ``alpha / 2``):

      sigma'(x) = (alpha / 2) / (1 + (pi / 2 * alpha * x)**2)

  Args:
    x: (*shape) normalised distance to threshold ``(v - A) / threshold``.
    alpha: steepness (Python float; default 2, giving peak 1).

  Returns:
    (*shape) spikes in ``x``'s dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax_eprop import surrogates
    >>> jax.grad(surrogates.arctan)(jnp.array(0.))
    Array(1., dtype=float32)
  """
  return heaviside(x)
