"""Model shapes, registry and the airbench initializers."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodel import count_params, get_model
from jaxmodel import models

SMALL = {
    'seed_cnn': {},
    'mlp': {'hidden': (32,), 'dropout': 0.1},
    'resnet': {'stage_sizes': (1, 1), 'width': 8},
    'airbench': {'widths': (8, 16, 16)},
}


@pytest.mark.parametrize('name', sorted(SMALL))
@pytest.mark.parametrize('num_classes', [10, 7])
def test_logits_shape_in_train_and_eval_mode(name, num_classes):
  model = get_model(name, num_classes=num_classes, **SMALL[name])
  x = jnp.ones((3, 32, 32, 3))
  variables = jax.jit(model.init, static_argnames='train')(jax.random.PRNGKey(0), x, train=False)
  apply = jax.jit(model.apply, static_argnames=('train', 'mutable'))
  chex.assert_shape(apply(variables, x, train=False), (3, num_classes))
  logits, _ = apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)},
                    mutable=('batch_stats',))
  chex.assert_shape(logits, (3, num_classes))
  chex.assert_tree_all_finite(logits)


def test_seed_cnn_has_the_pytorch_tutorial_layers():
  params = jax.eval_shape(get_model('seed_cnn').init, jax.random.PRNGKey(0),
                          jnp.ones((1, 32, 32, 3)))['params']
  shapes = {k: v['kernel'].shape for k, v in params.items()}
  assert shapes == {'Conv_0': (5, 5, 3, 6), 'Conv_1': (5, 5, 6, 16), 'Dense_0': (400, 120),
                    'Dense_1': (120, 84), 'Dense_2': (84, 10)}
  # The same count torch reports for the tutorial's Net: sum(p.numel() for p in net.parameters()).
  assert count_params(params) == 62006


def test_the_seed_cnns_conv_relu_pool_is_flaxs_conv_relu_and_pool():
  # Its parameters are nn.Conv's, initialized alike, so checkpoints of either load in the other.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 13, 13, 3)), jnp.float32)
  fused, conv = models.ConvReluPool(4, (3, 3)), nn.Conv(4, (3, 3), padding='VALID')
  variables = fused.init(jax.random.PRNGKey(0), x)
  chex.assert_trees_all_equal(variables, conv.init(jax.random.PRNGKey(0), x))
  variables = jax.tree.map(lambda p: p + 0.1, variables)  # a bias that is not 0
  for images in x, x.astype(jnp.bfloat16):  # promoted with the parameters, as nn.Conv does
    chex.assert_trees_all_close(
        jax.jit(fused.apply)(variables, images),
        nn.max_pool(nn.relu(conv.apply(variables, images)), (2, 2), (2, 2)), rtol=1e-5, atol=1e-6)


def test_resnet18_stages_and_batchnorm_state():
  # eval_shape: the architecture without running (or compiling) it.
  variables = jax.eval_shape(get_model('resnet').init, jax.random.PRNGKey(0),
                             jnp.ones((1, 32, 32, 3)))
  assert sum(k.startswith('ResidualBlock') for k in variables['params']) == 8
  assert 'batch_stats' in variables
  assert 10e6 < count_params(variables['params']) < 12e6  # ResNet-18 on CIFAR: ~11.2M


def test_unknown_model_and_argument_are_named():
  with pytest.raises(ValueError, match="unknown model 'resnt'"):
    get_model('resnt')
  with pytest.raises(ValueError, match="model 'mlp' got an unknown argument.*hidden"):
    get_model('mlp', widths=(3,))


def test_dirac_init_passes_the_first_channels_through():
  kernel = models.dirac_init()(jax.random.PRNGKey(0), (3, 3, 4, 6))
  x = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  chex.assert_trees_all_close(y[..., :4], x, atol=1e-6)


def test_whitening_kernel_whitens_patches():
  rng = np.random.default_rng(0)
  # Correlated channels and neighbouring pixels, like natural images.
  images = rng.normal(size=(64, 16, 16, 3)).cumsum(axis=1) + rng.normal(size=(64, 16, 16, 1))
  kernel = models.whitening_kernel(images, width=24, eps=1e-8)
  chex.assert_shape(kernel, (2, 2, 3, 24))
  np.testing.assert_allclose(kernel[..., 12:], -kernel[..., :12])
  out = jax.lax.conv_general_dilated(jnp.asarray(images, jnp.float32), kernel, (1, 1), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  covariance = np.cov(np.asarray(out[..., :12]).reshape(-1, 12), rowvar=False)
  np.testing.assert_allclose(covariance, np.eye(12), atol=1e-3)


def test_init_from_data_sets_only_the_airbench_stem():
  model = get_model('airbench', widths=(8, 8, 8))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)))['params']
  images = np.random.default_rng(0).normal(size=(8, 32, 32, 3))
  new = models.init_from_data(model, params, lambda: images)
  chex.assert_trees_all_close(new['whiten']['kernel'], models.whitening_kernel(images))
  chex.assert_trees_all_equal(new['ConvGroup_0'], params['ConvGroup_0'])
  cnn = get_model('seed_cnn')
  cnn_params = jax.eval_shape(cnn.init, jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)))['params']
  never = lambda: pytest.fail('seed_cnn needs no data for its init')
  assert models.init_from_data(cnn, cnn_params, never) is cnn_params
