"""The train state and the data iterator round-trip through an Orbax checkpoint."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodel import checkpoint, create_train_state, get_model, train_step
from jaxmodel import data
from test_data import PLAIN, ArraySource


def _state(seed):
  model = get_model('resnet', stage_sizes=(1,), width=4)
  return create_train_state(model, optax.adamw(1e-3), jnp.zeros((2, 8, 8, 3)),
                            jax.random.PRNGKey(seed))


def test_state_and_iterator_round_trip(tmp_path):
  iterator = iter(data.train_dataset(ArraySource(40), PLAIN, 4, seed=0))
  state = _state(0)
  step = jax.jit(train_step)
  for _ in range(3):
    state, _ = step(state, next(iterator))
  manager = checkpoint.make_manager(str(tmp_path), keep=2)
  checkpoint.save(manager, state, iterator)
  manager.wait_until_finished()
  expected_batch = next(iterator)

  fresh_iterator = iter(data.train_dataset(ArraySource(40), PLAIN, 4, seed=0))
  restored = checkpoint.restore(checkpoint.make_manager(str(tmp_path)), _state(1), fresh_iterator)
  assert int(restored.step) == 3
  for field in ('params', 'model_state', 'opt_state', 'rng'):
    chex.assert_trees_all_equal(getattr(restored, field), getattr(state, field))
  chex.assert_trees_all_equal(next(fresh_iterator), expected_batch)
  # The restored state trains on exactly like the original.
  chex.assert_trees_all_equal(step(restored, expected_batch)[0].params,
                              step(state, expected_batch)[0].params)


def test_manager_keeps_the_newest_checkpoints(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), keep=2)
  state = _state(0)
  for i in (1, 2, 3):
    checkpoint.save(manager, state.replace(step=jnp.asarray(i, jnp.int32)))
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]
  assert manager.latest_step() == 3
  assert np.asarray(checkpoint.restore(manager, state).step) == 3
