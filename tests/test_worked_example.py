"""The seed's worked example: hand-written backpropagation of a 2-3-1 network equals jax.grad."""

import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'


def _example():
  spec = importlib.util.spec_from_file_location('worked_example',
                                                EXPERIMENTS / 'worked_example.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _loss(params, x, t):
  h = jax.nn.sigmoid(x @ params['w1'])
  y = jax.nn.sigmoid(h @ params['w2'])
  return (y - t) ** 2


def test_hand_backprop_matches_jax_grad():
  ex = _example()
  params = {'w1': jnp.asarray(ex.W1, jnp.float32), 'w2': jnp.asarray(ex.W2, jnp.float32)}
  loss, grads = jax.value_and_grad(_loss)(params, jnp.asarray(ex.X, jnp.float32), ex.TARGET)
  record = ex.backprop_by_hand(ex.W1, ex.W2)  # float64 numpy
  np.testing.assert_allclose(record['loss'], loss, rtol=1e-5)
  np.testing.assert_allclose(record['grad_w1'], grads['w1'], rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(record['grad_w2'], grads['w2'], rtol=1e-5)
  # The intermediate the step hinges on: dL/dz2 = 2 (y - t) y (1 - y), by jax too.
  dz2 = jax.grad(lambda z2: (jax.nn.sigmoid(z2) - ex.TARGET) ** 2)(jnp.float32(record['z2']))
  np.testing.assert_allclose(record['delta2'], dz2, rtol=1e-5)


def test_the_step_is_gradient_descent_and_lowers_the_loss():
  ex = _example()
  new_w1, new_w2, record, loss_after = ex.one_step(lr=1.0)
  chex.assert_trees_all_close((new_w1, new_w2), (ex.W1 - record['grad_w1'],
                                                 ex.W2 - record['grad_w2']))
  assert loss_after < record['loss']
  # The hand-computed first value, checked by arithmetic: x . W1[:, 0] = 0.35*0.1 + 0.9*0.8.
  np.testing.assert_allclose(record['z1'][0], 0.755)


def test_the_committed_example_is_the_scripts_output():
  ex = _example()
  committed = (EXPERIMENTS / 'worked_example.md').read_text()
  assert committed == ex.render(), ('experiments/worked_example.md is stale: rerun '
                                    'python experiments/worked_example.py > experiments/worked_example.md')
