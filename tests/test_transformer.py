"""ViT, GPT and ResNet-34: shapes, structure, one step lowers the loss, the GPT's causal mask and
its key/value cache."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmodel import count_params, create_train_state, get_model, train_step

TINY_VIT = {'size': 'tiny', 'width': 32, 'depth': 2, 'num_heads': 2, 'mlp_dim': 64}
TINY_GPT = {'vocab_size': 13, 'block_size': 16, 'width': 32, 'depth': 2, 'num_heads': 4}


def _shapes(name, x, **kwargs):
  return jax.eval_shape(get_model(name, **kwargs).init, jax.random.PRNGKey(0), x)


def test_resnet34_has_its_16_blocks_and_21m_params():
  variables = _shapes('resnet', jnp.ones((1, 32, 32, 3)), stage_sizes=(3, 4, 6, 3))
  assert sum(k.startswith('ResidualBlock') for k in variables['params']) == 16
  assert 21.0e6 < count_params(variables['params']) < 21.5e6  # ResNet-34 on CIFAR: ~21.3M


@pytest.mark.parametrize('size,low,high', [('tiny', 5.2e6, 5.6e6), ('small', 21.0e6, 21.6e6)])
def test_vit_presets_have_the_published_sizes(size, low, high):
  params = _shapes('vit', jnp.ones((1, 32, 32, 3)), size=size)['params']
  assert params['position'].shape[0] == 64  # 4x4 patches of a 32x32 image
  assert low < count_params(params) < high  # ViT-Ti ~5.4M, ViT-S ~21.3M with a 10-class head


def test_vit_logits_shape_and_unknown_size():
  model = get_model('vit', num_classes=7, **TINY_VIT)
  x = jnp.ones((3, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  chex.assert_shape(jax.jit(model.apply)(variables, x), (3, 7))
  with pytest.raises(ValueError, match="unknown ViT size 'huge'"):
    _shapes('vit', x, size='huge')


def _tokens(batch=2, length=16, vocab=13, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def test_gpt_logits_per_position_and_weight_tying():
  tokens = _tokens()
  variables = _shapes('gpt', tokens, **TINY_GPT)
  chex.assert_shape(jax.eval_shape(get_model('gpt', **TINY_GPT).apply, variables, tokens),
                    (2, 16, 13))
  untied = _shapes('gpt', tokens, **TINY_GPT, tie_weights=False)['params']
  assert 'head' not in variables['params'] and 'head' in untied
  assert count_params(untied) - count_params(variables['params']) == 32 * 13 + 13


def test_gpt_is_causal():
  model = get_model('gpt', **TINY_GPT)
  tokens = _tokens()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 13)
  apply = jax.jit(model.apply)
  a, b = apply(variables, tokens), apply(variables, changed)
  chex.assert_trees_all_close(a[:, :10], b[:, :10])  # the past does not see the future
  assert not np.allclose(a[:, 10:], b[:, 10:])


def test_gpt_kv_cache_decoding_equals_the_full_forward_pass():
  model = get_model('gpt', **TINY_GPT)
  tokens = _tokens()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)['params']
  decoder = model.clone(decode=True)
  cache = jax.tree.map(jnp.zeros_like, _shapes('gpt', tokens, **TINY_GPT, decode=True)['cache'])
  apply = jax.jit(functools.partial(decoder.apply, mutable=['cache']))
  pieces = []
  for start, stop in [(0, 5), *((t, t + 1) for t in range(5, 16))]:  # a prompt, then one by one
    logits, variables = apply({'params': params, 'cache': cache}, tokens[:, start:stop])
    cache = variables['cache']
    pieces.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(pieces, axis=1),
                              jax.jit(model.apply)({'params': params}, tokens), atol=1e-5)


@pytest.mark.parametrize('name,kwargs,inputs,labels', [
    ('resnet', {'num_classes': 10, 'stage_sizes': (3, 4, 6, 3), 'width': 4},  # ResNet-34, narrow
     np.random.default_rng(0).normal(size=(8, 32, 32, 3)), np.arange(8) % 10),
    ('vit', {'num_classes': 10, **TINY_VIT},
     np.random.default_rng(0).normal(size=(8, 32, 32, 3)), np.arange(8) % 10),
    ('gpt', TINY_GPT, np.asarray(_tokens(4)), np.asarray(_tokens(4, seed=1))),
])
def test_one_train_step_lowers_the_loss(name, kwargs, inputs, labels):
  model = get_model(name, **kwargs)
  key = 'tokens' if name == 'gpt' else 'image'
  batch = {key: jnp.asarray(inputs, jnp.int32 if name == 'gpt' else jnp.float32),
           'label': jnp.asarray(labels, jnp.int32)}
  # Jitted: an eager init compiles each of ResNet-34's ops on its own, far slower.
  init = jax.jit(create_train_state, static_argnums=(0, 1))
  state = init(model, optax.adam(3e-3), batch[key][:1], jax.random.PRNGKey(0))
  step = jax.jit(train_step)
  state, before = step(state, batch)
  _, after = step(state, batch)  # the loss of the same batch after one update
  assert float(after['loss']) < float(before['loss'])
