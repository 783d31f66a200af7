"""Optimizers and schedules built from config values."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodel import make_lookahead, make_optimizer, make_schedule
from jaxmodel.config import base_config


def _config(**changes):
  config = base_config().optimizer
  config.update(changes)
  return config


@pytest.mark.parametrize('schedule', ['warmup_cosine', 'warmup_linear'])
def test_warmup_then_decay_hits_its_marks(schedule):
  lr = make_schedule(_config(schedule=schedule, learning_rate=2.0, warmup_fraction=0.1,
                             init_scale=0.2, final_scale=0.05), total_steps=100)
  np.testing.assert_allclose(lr(0), 0.4, rtol=1e-6)
  np.testing.assert_allclose(lr(5), 1.2, rtol=1e-6)
  np.testing.assert_allclose(lr(10), 2.0, rtol=1e-6)
  np.testing.assert_allclose(lr(100), 0.1, rtol=1e-5)
  middle = 2.0 * (0.05 + 0.95 * 0.5)  # half-way through the decay, for both shapes
  np.testing.assert_allclose(lr(55), middle, rtol=1e-5)
  assert make_schedule(_config(schedule='constant', learning_rate=0.3), 100)(77) == 0.3


def test_sgd_with_nesterov_and_l2_matches_the_torch_formula():
  params = {'w': jnp.array([1.0, -2.0])}
  grads = {'w': jnp.array([0.5, 0.25])}
  tx = make_optimizer(_config(name='sgd', learning_rate=0.1, momentum=0.9, nesterov=True,
                              weight_decay=0.01, schedule='constant'), 10)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  g = grads['w'] + 0.01 * params['w']  # torch.optim.SGD: decay added to the gradient
  buf = g  # first step: the momentum buffer is the gradient
  chex.assert_trees_all_close(updates['w'], -0.1 * (g + 0.9 * buf), rtol=1e-6)


@pytest.mark.parametrize('name', ['sgd', 'adam', 'adamw'])
def test_each_optimizer_minimizes_a_quadratic(name):
  tx = make_optimizer(_config(name=name, learning_rate=0.05, weight_decay=1e-4,
                              schedule='constant'), 200)
  params = {'w': jnp.array([3.0, -1.0])}
  state = tx.init(params)
  loss = lambda p: jnp.sum(p['w'] ** 2)
  for _ in range(200):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < 1e-2


def test_lr_multipliers_freeze_and_scale_groups():
  params = {'stem': {'kernel': jnp.ones(2)}, 'norm': {'bias': jnp.ones(2)},
            'head': {'kernel': jnp.ones(2)}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = make_optimizer(_config(name='sgd', momentum=0.0, learning_rate=0.1, weight_decay=0.0,
                              schedule='constant',
                              lr_multipliers=(('stem/kernel', 0.0), ('norm/bias', 4.0))), 10)
  updates, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_close(updates, {'stem': {'kernel': jnp.zeros(2)},
                                        'norm': {'bias': -0.4 * jnp.ones(2)},
                                        'head': {'kernel': -0.1 * jnp.ones(2)}})


def test_freeze_after_stops_the_matched_params_after_their_steps():
  params = {'whiten': {'bias': jnp.zeros(2)}, 'head': {'kernel': jnp.zeros(2)}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = make_optimizer(_config(name='sgd', momentum=0.9, learning_rate=0.1, weight_decay=0.0,
                              schedule='constant', freeze_after=(('whiten/bias', 0.3),)), 10)
  state, history = tx.init(params), []
  for _ in range(10):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  # 3 of the 10 steps train the bias (momentum and all), then it stays; the head goes on.
  chex.assert_trees_all_equal(*[h['whiten']['bias'] for h in history[2:]])
  assert float(history[1]['whiten']['bias'][0]) < float(history[0]['whiten']['bias'][0]) < 0
  chex.assert_trees_all_close(history[2]['whiten']['bias'], history[2]['head']['kernel'])
  assert float(history[-1]['head']['kernel'][0]) < float(history[2]['head']['kernel'][0])


def test_gradient_clipping_bounds_the_step():
  tx = make_optimizer(_config(name='sgd', momentum=0.0, learning_rate=1.0, weight_decay=0.0,
                              schedule='constant', grad_clip_norm=1.0), 10)
  params = {'w': jnp.zeros(2)}
  updates, _ = tx.update({'w': jnp.array([30.0, 40.0])}, tx.init(params), params)
  chex.assert_trees_all_close(updates['w'], jnp.array([-0.6, -0.8]), rtol=1e-6)


def test_unknown_names_raise():
  with pytest.raises(ValueError, match='unknown optimizer'):
    make_optimizer(_config(name='lion'), 10)
  with pytest.raises(ValueError, match='unknown schedule'):
    make_optimizer(_config(schedule='step'), 10)


def test_lookahead_averages_every_n_steps_as_airbench_does():
  total, every = 13, 3
  config = _config(name='sgd', learning_rate=0.1, momentum=0.0, weight_decay=0.0,
                   schedule='constant', lookahead_every=every, lookahead_decay=0.9,
                   lookahead_power=2.0)
  tx, lookahead = make_optimizer(config, total), make_lookahead(config, total)
  params, model_state = {'w': jnp.array([1.0, -3.0])}, {'stats': {'mean': jnp.array([0.5])}}
  opt_state, average = tx.init(params), lookahead.init(params, model_state)
  grad = lambda p: {'w': 2 * p['w'] + 1.0}
  # By hand: plain SGD steps, and statistics that move by +1 a step; on every third step
  # average <- d*average + (1-d)*current and current <- average, d = 0.9^3 * (step/total)^2;
  # after the last step (13, not a multiple of 3) current <- average.
  net, stats = np.array([1.0, -3.0]), np.array([0.5])
  average_net, average_stats = net.copy(), stats.copy()
  for step in range(1, total + 1):
    updates, opt_state = tx.update(grad(params), opt_state, params)
    model_state = {'stats': {'mean': model_state['stats']['mean'] + 1.0}}
    params, model_state, average = lookahead.update(
        jnp.asarray(step), optax.apply_updates(params, updates), model_state, average)
    net, stats = net - 0.1 * (2 * net + 1.0), stats + 1.0
    if step % every == 0:
      d = 0.9**3 * (step / total)**2
      average_net, average_stats = d * average_net + (1 - d) * net, d * average_stats + (1 - d) * stats
      net, stats = average_net.copy(), average_stats.copy()
    if step == total:
      net, stats = average_net.copy(), average_stats.copy()
    np.testing.assert_allclose(params['w'], net, rtol=1e-5, err_msg=f'step {step}')
    np.testing.assert_allclose(model_state['stats']['mean'], stats, rtol=1e-5,
                               err_msg=f'step {step}')
  assert not np.allclose(net, [1.0, -3.0])  # it trained
  assert stats[0] < 0.5 + total - 1  # the statistics were pulled back towards their average


def test_train_step_averages_batchnorm_statistics_with_the_params():
  from jaxmodel import create_train_state, get_model, train_step
  config = _config(name='sgd', learning_rate=0.1, momentum=0.9, schedule='constant',
                   lookahead_every=2, lookahead_decay=0.9, lookahead_power=0.0)
  model = get_model('airbench', widths=(8, 8, 8), whiten_width=4)
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  batch = {'image': images, 'label': jnp.array([0, 1, 2, 3])}
  states = {name: create_train_state(model, make_optimizer(config, 4), images, jax.random.PRNGKey(0),
                                     lookahead=make_lookahead(config, 4) if name == 'lookahead' else None)
            for name in ('lookahead', 'plain')}
  step = jax.jit(train_step)
  first = {name: step(state, batch)[0] for name, state in states.items()}
  # Step 1 is not a sync step: the lookahead changes nothing yet.
  chex.assert_trees_all_close(first['lookahead'].params, first['plain'].params)
  chex.assert_trees_all_close(first['lookahead'].model_state, first['plain'].model_state)
  second, _ = step(first['lookahead'], batch)
  plain, _ = step(first['lookahead'].replace(lookahead=None), batch)
  # Step 2 syncs (decay 0.9^2 = 0.81): params and BatchNorm statistics both move to
  # 0.81 x the initial values + 0.19 x where plain training put them.
  initial = states['lookahead']
  for field in ('params', 'model_state'):
    expected = jax.tree.map(lambda a, x: 0.81 * a + 0.19 * x, getattr(initial, field),
                            getattr(plain, field))
    chex.assert_trees_all_close(getattr(second, field), expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(second.average[field], expected, rtol=1e-5, atol=1e-6)
  means = jax.tree.leaves(second.model_state)
  assert any(not np.allclose(m, p) for m, p in zip(means, jax.tree.leaves(plain.model_state)))


def test_lookahead_state_survives_a_donating_train_step():
  from jaxmodel import create_train_state, get_model, train_step
  config = _config(name='sgd', learning_rate=0.1, momentum=0.9, schedule='constant',
                   lookahead_every=2)
  state = create_train_state(get_model('mlp', hidden=(8,)), make_optimizer(config, 4),
                             jnp.zeros((2, 4, 4, 3)), jax.random.PRNGKey(0),
                             lookahead=make_lookahead(config, 4))
  batch = {'image': jnp.ones((2, 4, 4, 3)), 'label': jnp.array([0, 1])}
  step = jax.jit(train_step, donate_argnums=0)  # params and the average are separate buffers
  for _ in range(2):
    state, metrics = step(state, batch)
  assert int(state.step) == 2 and np.isfinite(float(metrics['loss']))
