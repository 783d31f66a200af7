"""The train state and the data iterator round-trip through an Orbax checkpoint."""

import glob
import os
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodel import checkpoint, create_train_state, get_model, train_step
from jaxmodel import data, optim
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


def test_lookahead_average_round_trips(tmp_path):
  lookahead = optim.Lookahead(every=2, decay=lambda step: 0.5, total_steps=10)
  model = get_model('resnet', stage_sizes=(1,), width=4)  # BatchNorm: the average holds its stats
  make = lambda seed: create_train_state(model, optax.sgd(0.1, 0.9), jnp.zeros((2, 8, 8, 3)),
                                         jax.random.PRNGKey(seed), lookahead=lookahead)
  batch = {'image': jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3)),
           'label': jnp.array([0, 1])}
  step = jax.jit(train_step)
  state = make(0)
  for _ in range(3):  # step 2 synced; step 3 moved the params away from the average again
    state, _ = step(state, batch)
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save(manager, state)
  manager.wait_until_finished()
  restored = checkpoint.restore(checkpoint.make_manager(str(tmp_path)), make(1))
  chex.assert_trees_all_equal(restored.average, state.average)
  # The next step syncs (step 4) from the restored average exactly as from the original.
  chex.assert_trees_all_equal(step(restored, batch)[0].variables(), step(state, batch)[0].variables())
  with pytest.raises(AssertionError):
    chex.assert_trees_all_close(state.average['params'], state.params)


def test_manager_keeps_the_newest_checkpoints(tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), keep=2)
  state = _state(0)
  for i in (1, 2, 3):
    checkpoint.save(manager, state.replace(step=jnp.asarray(i, jnp.int32)))
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]
  assert manager.latest_step() == 3
  assert np.asarray(checkpoint.restore(manager, state).step) == 3


def _saved_twice(tmp_path, state):
  manager = checkpoint.make_manager(str(tmp_path), keep=3)
  for i in (1, 2):
    checkpoint.save(manager, state.replace(step=jnp.asarray(i, jnp.int32)),
                    fingerprint={'seed': i})
  checkpoint.wait(manager)
  return os.path.join(str(tmp_path), 'checkpoints')


def _truncate(path):
  data = max(glob.glob(f'{path}/state/d/*'), key=os.path.getsize)
  os.truncate(data, os.path.getsize(data) // 2)


def _flip_a_byte(path):
  data = max(glob.glob(f'{path}/state/d/*'), key=os.path.getsize)
  raw = bytearray(open(data, 'rb').read())
  raw[len(raw) // 2] ^= 0xFF
  open(data, 'wb').write(bytes(raw))


@pytest.mark.parametrize('damage', [
    _truncate, _flip_a_byte,
    lambda path: open(f'{path}/state/_METADATA', 'w').write('{not json'),
    lambda path: os.remove(f'{path}/state/_METADATA'),
    lambda path: os.remove(f'{path}/run/metadata'),
], ids=['truncated', 'flipped_byte', 'garbled_metadata', 'missing_metadata', 'missing_run'])
def test_a_damaged_newest_checkpoint_is_set_aside_for_the_previous_one(tmp_path, capsys, damage):
  state = _state(0)
  directory = _saved_twice(tmp_path, state)
  damage(os.path.join(directory, '2'))
  manager = checkpoint.make_manager(str(tmp_path))
  restored = checkpoint.restore(manager, _state(1))
  assert int(restored.step) == 1
  chex.assert_trees_all_equal(restored.params, state.params)
  warning = capsys.readouterr().err.strip()
  assert warning.startswith('warning: checkpoint 2 is damaged') and '\n' not in warning
  # Kept for inspection, out of the way of the step the resumed run will save again.
  assert os.path.isdir(tmp_path / 'corrupt_checkpoints' / '2')
  assert manager.all_steps() == [1]


def test_only_damaged_checkpoints_is_a_one_line_error(tmp_path):
  directory = _saved_twice(tmp_path, _state(0))
  for step in ('1', '2'):
    os.remove(os.path.join(directory, step, 'state', '_METADATA'))
  with pytest.raises(checkpoint.CheckpointError, match='no readable checkpoint left'):
    checkpoint.restore(checkpoint.make_manager(str(tmp_path)), _state(0))


def test_a_checkpoint_of_another_model_names_the_first_differing_parameter(tmp_path):
  _saved_twice(tmp_path, _state(0))
  wider = create_train_state(get_model('resnet', stage_sizes=(1,), width=8), optax.adamw(1e-3),
                             jnp.zeros((2, 8, 8, 3)), jax.random.PRNGKey(0))
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.restore(checkpoint.make_manager(str(tmp_path)), wider)
  message = str(error.value)
  assert 'params/BatchNorm_0/bias: (4,) in the checkpoint, (8,) now' in message
  assert '--config.init_from=WORKDIR' in message and '\n' not in message
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']  # nothing moved or lost


def test_the_saved_config_fingerprint_is_checked_on_restore(tmp_path):
  _saved_twice(tmp_path, _state(0))
  manager = checkpoint.make_manager(str(tmp_path))
  assert checkpoint.saved_fingerprint(manager) == {'seed': 2}
  seen = []
  checkpoint.restore(manager, _state(0), check_config=seen.append)
  assert seen == [{'seed': 2}]


def test_restoring_never_unpickles(tmp_path, monkeypatch):
  iterator = iter(data.train_dataset(ArraySource(40), PLAIN, 4, seed=0))
  next(iterator)
  manager = checkpoint.make_manager(str(tmp_path))
  checkpoint.save(manager, _state(0), iterator, fingerprint={'a': 1})
  checkpoint.wait(manager)

  def refuse(*args, **kwargs):
    raise AssertionError('a checkpoint was unpickled')
  for name in ('load', 'loads', 'Unpickler'):
    monkeypatch.setattr(pickle, name, refuse)
  fresh = iter(data.train_dataset(ArraySource(40), PLAIN, 4, seed=0))
  restored = checkpoint.restore(checkpoint.make_manager(str(tmp_path)), _state(1), fresh)
  chex.assert_trees_all_equal(restored.params, _state(0).params)
