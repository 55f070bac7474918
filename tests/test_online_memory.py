"""Working memory of online e-prop is flat in the sequence length.

`jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes` is
XLA's deterministic count of the working memory of a compiled function.
"""

import jax
import jax.numpy as jnp
import pytest
from online_models import IN, Net, alif, cross_entropy, split_variables

import flax_eprop as fe

BATCH, CHUNK = 4, 50


def temp_bytes(f, model, time):
  """Working memory of ``f(params, state, xs, ys)`` for ``time`` steps."""
  spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  variables = jax.eval_shape(model.init, jax.random.key(0), spec(BATCH, 1, IN))
  params, state = split_variables(variables)
  xs, ys = spec(BATCH, time, IN), spec(BATCH, time, dtype=jnp.int32)
  compiled = jax.jit(f).lower(params, state, xs, ys).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_online_memory_flat_in_time():
  model = Net((alif(jnp.float32),))
  online = fe.online_value_and_grad(model.apply, cross_entropy, CHUNK)
  bptt = fe.bptt_value_and_grad(model.apply, cross_entropy)
  short, long = temp_bytes(online, model, 200), temp_bytes(online, model, 2000)
  assert short > 0
  assert abs(long - short) <= 0.05 * short, (short, long)
  # the measurement sees BPTT's activations grow with T
  bptt_short = temp_bytes(bptt, model, 200)
  bptt_long = temp_bytes(bptt, model, 2000)
  assert bptt_long > 2 * bptt_short, (bptt_short, bptt_long)
