"""The seed's regularizers, each switched by a config key: dropout (model.dropout), weight decay
(optimizer.weight_decay), data augmentation (data.crop_padding, data.flip) and label smoothing
(label_smoothing). Early stopping (early_stopping_patience) is tested in test_lifecycle.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodel import config as config_lib, data, get_loss, get_model, make_optimizer


@pytest.mark.parametrize('name,kwargs,inputs', [
    ('seed_cnn', {}, jnp.ones((4, 32, 32, 3))),
    ('vit', {'width': 16, 'depth': 1, 'num_heads': 2, 'mlp_dim': 32}, jnp.ones((4, 32, 32, 3))),
    ('gpt', {'vocab_size': 11, 'block_size': 8, 'width': 16, 'depth': 1, 'num_heads': 2},
     jnp.arange(32, dtype=jnp.int32).reshape(4, 8) % 11),
])
def test_dropout_switch_randomizes_training_only(name, kwargs, inputs):
  config = config_lib.load_config('default')
  config.model = {'name': name, **kwargs, 'dropout': 0.5}
  model = get_model(name, **{k: v for k, v in config.model.items() if k != 'name'})
  plain = get_model(name, **kwargs)  # dropout 0, the default
  variables = jax.jit(plain.init)(jax.random.PRNGKey(0), inputs)
  # Nudged off the init: the ViT's zero-initialized head would hide any dropout behind it.
  variables = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(3), p.shape),
                           variables)
  train = jax.jit(lambda key: model.apply(variables, inputs, train=True, rngs={'dropout': key}))
  a, b = train(jax.random.PRNGKey(1)), train(jax.random.PRNGKey(2))
  assert not np.allclose(a, b)  # other masks, other outputs
  np.testing.assert_allclose(train(jax.random.PRNGKey(1)), a)  # the same key, the same masks
  evaluate = lambda m: jax.jit(lambda: m.apply(variables, inputs, train=False))()
  np.testing.assert_allclose(evaluate(model), evaluate(plain), rtol=1e-6)  # off at evaluation
  same = jax.jit(lambda: plain.apply(variables, inputs, train=True,
                                     rngs={'dropout': jax.random.PRNGKey(1)}))()
  np.testing.assert_allclose(same, evaluate(plain), rtol=1e-5)  # rate 0: no dropout at all


@pytest.mark.parametrize('optimizer', ['sgd', 'adam', 'adamw'])
def test_weight_decay_switch_shrinks_weights_without_a_gradient(optimizer):
  config = config_lib.load_config('default').optimizer
  config.name, config.schedule, config.learning_rate = optimizer, 'constant', 0.1
  params = {'w': jnp.full((3,), 2.0)}
  zero = {'w': jnp.zeros(3)}
  for decay, shrinks in [(0.0, False), (0.01, True)]:
    config.weight_decay = decay
    tx = make_optimizer(config, total_steps=10)
    updates, _ = tx.update(zero, tx.init(params), params)
    new = params['w'] + updates['w']
    assert bool(jnp.all(new < 2.0)) == shrinks and bool(jnp.all(new <= 2.0))
  if optimizer == 'adamw':  # decoupled: exactly lr * decay * w
    np.testing.assert_allclose(new, 2.0 - 0.1 * 0.01 * 2.0, rtol=1e-6)


def test_augmentation_switches():
  config = config_lib.load_config('default')
  images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  batch = {'image': images, 'label': np.zeros(16, np.int32)}
  rng = lambda: np.random.default_rng(5)
  on = data.preprocess_from_config(config, train=True).train(batch, rng())['image']
  config.data.crop_padding, config.data.flip = 0, False
  off = data.preprocess_from_config(config, train=True).train(batch, rng())['image']
  evaluated = data.preprocess_from_config(config, train=False).eval(batch)['image']
  np.testing.assert_array_equal(off, evaluated)  # switched off: the train images are untouched
  assert not np.array_equal(on, evaluated)


def test_label_smoothing_switch_on_class_and_token_labels():
  config = config_lib.load_config('default')
  logits = jnp.array([[[20.0, 0.0, 0.0], [0.0, 20.0, 0.0]]])  # (B=1, T=2, classes): confident
  labels = jnp.array([[0, 1]])  # and right
  sharp = get_loss(config.loss, config.label_smoothing)(logits, labels)
  config.label_smoothing = 0.3
  smooth = get_loss(config.loss, config.label_smoothing)(logits, labels)
  assert sharp.shape == smooth.shape == (1, 2)  # per position for a language model
  assert float(jnp.max(sharp)) < 1e-6
  # Smoothed targets give 0.1 to each wrong class: -0.1 log p(wrong) = 0.1 * 20 nats each.
  np.testing.assert_allclose(smooth, 2 * 0.1 * 20.0, rtol=1e-3)
