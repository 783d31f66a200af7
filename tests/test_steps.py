"""The pure train and eval steps: they learn, agree with and without jit, and count exactly."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodel import (create_train_state, cross_entropy_loss, eval_step, get_loss, get_model,
                      mse_loss, train_step)
from jaxmodel.steps import tta_logits


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
          'label': rng.integers(0, 10, n).astype(np.int32)}


def _state(name='mlp', loss_fn=cross_entropy_loss, learning_rate=0.05, **kwargs):
  model = get_model(name, **kwargs)
  return create_train_state(model, optax.sgd(learning_rate, 0.9), jnp.zeros((2, 32, 32, 3)),
                            jax.random.PRNGKey(0), loss_fn)


@pytest.mark.parametrize('name,kwargs', [
    ('mlp', {'hidden': (64,), 'dropout': 0.1}),
    ('seed_cnn', {}),
    ('airbench', {'widths': (8, 8, 16)}),
])
def test_train_step_lowers_the_loss_on_a_fixed_batch(name, kwargs):
  state, batch = _state(name, **kwargs), _batch()
  step = jax.jit(train_step, donate_argnums=0)
  state, first = step(state, batch)
  for _ in range(15):
    state, metrics = step(state, batch)
  assert int(state.step) == 16
  assert float(metrics['loss']) < 0.7 * float(first['loss'])


def test_grad_norm_is_the_gradients_global_norm_and_optional():
  state, batch = _state('seed_cnn'), _batch()
  grads = jax.grad(lambda p: jnp.mean(cross_entropy_loss(
      state.apply_fn({'params': p}, batch['image'], train=True), batch['label'])))(state.params)
  with_norm, metrics = jax.jit(train_step)(state, batch)
  flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
  np.testing.assert_allclose(metrics['grad_norm'], jnp.sqrt(jnp.sum(flat ** 2)), rtol=1e-5)
  without, metrics_without = jax.jit(functools.partial(train_step, grad_norm=False))(state, batch)
  assert set(metrics_without) == {'loss', 'accuracy'}
  chex.assert_trees_all_close(without.params, with_norm.params, rtol=1e-6, atol=1e-8)


def test_train_step_updates_batchnorm_statistics():
  state = _state('resnet', stage_sizes=(1,), width=4)
  before = state.model_state['batch_stats']
  state, _ = jax.jit(train_step)(state, _batch())
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before,
                         state.model_state['batch_stats'])
  assert all(jax.tree.leaves(changed))


class StepVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_train_and_eval_steps_agree_with_and_without_jit(self):
    state, batch = _state('mlp', hidden=(32,), dropout=0.5), _batch(8)
    new_state, metrics = self.variant(train_step)(state, batch)
    reference_state, reference = jax.jit(train_step)(state, batch)
    chex.assert_trees_all_close(metrics, reference, rtol=1e-5)
    chex.assert_trees_all_close(new_state.params, reference_state.params, rtol=1e-5, atol=1e-7)
    sums = self.variant(eval_step)(new_state, {**batch, 'mask': np.ones(8, bool)})
    chex.assert_trees_all_close(sums, jax.jit(eval_step)(reference_state,
                                                          {**batch, 'mask': np.ones(8, bool)}),
                                rtol=1e-5)


def test_dropout_randomness_is_fold_in_of_the_step():
  state, batch = _state('mlp', hidden=(64,), dropout=0.5), _batch(8)
  step = jax.jit(train_step)
  a, _ = step(state, batch)
  b, _ = step(state, batch)  # the same step again: the same dropout masks
  chex.assert_trees_all_equal(a.params, b.params)
  later = state.replace(step=jnp.asarray(5, jnp.int32))
  c, _ = step(later, batch)  # another step number: other masks, other update
  assert not np.allclose(jax.tree.leaves(a.params)[0], jax.tree.leaves(c.params)[0])


def test_eval_step_counts_only_unmasked_examples():
  state, batch = _state('mlp', hidden=(16,)), _batch(10)
  mask = np.arange(10) < 7
  sums = jax.jit(eval_step)(state, {**batch, 'mask': mask})
  logits = state.apply_fn(state.variables(), batch['image'][:7], train=False)
  losses = cross_entropy_loss(logits, batch['label'][:7])
  assert float(sums['count']) == 7
  np.testing.assert_allclose(float(sums['loss_sum']), float(jnp.sum(losses)), rtol=1e-5)
  assert float(sums['correct']) == float(jnp.sum(jnp.argmax(logits, -1) == batch['label'][:7]))


def test_test_time_augmentation_averages_airbenchs_six_views():
  state, batch = _state('mlp', hidden=(16,)), _batch(3)
  images = batch['image']
  logits = lambda x: np.asarray(state.apply_fn(state.variables(), x, train=False))
  with_flip = lambda x: (logits(x) + logits(x[:, :, ::-1])) / 2
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  views = {'none': logits(images), 'flip': with_flip(images),
           'flip_translate': with_flip(images) / 2 + (with_flip(padded[:, :-2, :-2])
                                                      + with_flip(padded[:, 2:, 2:])) / 4}
  for tta, expected in views.items():
    got = jax.jit(functools.partial(tta_logits, state.apply_fn, tta=tta))(state.variables(),
                                                                          images)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(views['flip_translate'], views['none'], atol=1e-3)
  sums = jax.jit(functools.partial(eval_step, tta='flip_translate'))(
      state, {**batch, 'mask': np.ones(3, bool)})
  np.testing.assert_allclose(float(sums['loss_sum']), float(jnp.sum(cross_entropy_loss(
      views['flip_translate'], batch['label']))), rtol=1e-5)
  with pytest.raises(ValueError, match='flip_translate'):
    tta_logits(state.apply_fn, state.variables(), images, 'rotate')


def test_losses_match_their_formulas():
  logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 0.3, -0.2]])
  labels = jnp.array([0, 2])
  log_p = jax.nn.log_softmax(logits)
  smoothing = 0.2
  targets = jax.nn.one_hot(labels, 3) * (1 - smoothing) + smoothing / 3
  chex.assert_trees_all_close(get_loss('cross_entropy', smoothing)(logits, labels),
                              -jnp.sum(targets * log_p, -1), rtol=1e-6)
  chex.assert_trees_all_close(get_loss('cross_entropy')(logits, labels),
                              -log_p[jnp.arange(2), labels], rtol=1e-6)
  chex.assert_trees_all_close(mse_loss(logits, labels),
                              jnp.mean((logits - jax.nn.one_hot(labels, 3)) ** 2, -1), rtol=1e-6)
  with pytest.raises(ValueError, match='unknown loss'):
    get_loss('hinge')


def test_mse_loss_trains_too():
  state, batch = _state('mlp', loss_fn=mse_loss, learning_rate=0.01, hidden=(64,)), _batch()
  step = jax.jit(train_step)
  state, first = step(state, batch)
  for _ in range(10):
    state, metrics = step(state, batch)
  assert float(metrics['loss']) < float(first['loss'])


def test_bfloat16_compute_trains_on_float32_params_close_to_float32():
  batch = _batch(32)
  states = {dtype: create_train_state(get_model('seed_cnn'), optax.sgd(0.05, 0.9),
                                      jnp.zeros((2, 32, 32, 3)), jax.random.PRNGKey(0),
                                      compute_dtype=dtype)
            for dtype in ('float32', 'bfloat16')}
  step = jax.jit(train_step)
  hlo = step.lower(states['bfloat16'], batch).as_text()
  assert 'bf16' in hlo and 'bf16' not in step.lower(states['float32'], batch).as_text()
  losses = {}
  for dtype, state in states.items():
    first = None
    for _ in range(5):
      state, metrics = step(state, batch)
      first = first if first is not None else float(metrics['loss'])
    losses[dtype] = (first, float(metrics['loss']))
    chex.assert_trees_all_equal_dtypes(state.params, states['float32'].params)  # float32 masters
  assert losses['bfloat16'][1] < losses['bfloat16'][0]  # it learns
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], rtol=0.05)
  logits = eval_step(state, {**batch, 'mask': np.ones(32, bool)})
  assert logits['loss_sum'].dtype == jnp.float32
