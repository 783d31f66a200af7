"""The fast-on-CPU convolution and pooling compute what XLA's do, values and gradients.

On CPU the convolutions run on oneDNN (jaxmodel.onednn); without it (JAXMODEL_ONEDNN=0, or
no compiler) on image patches and matmuls. Both paths are tested.
"""

import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest
from jax import lax

from jaxmodel import onednn, ops

CASES = [  # input (B, H, W, C), kernel (kh, kw, C, O), strides, padding
    ((4, 9, 9, 3), (3, 3, 3, 5), (1, 1), 'SAME'),
    ((2, 32, 32, 3), (2, 2, 3, 24), (2, 2), 'VALID'),
    ((3, 12, 12, 4), (5, 5, 4, 6), (1, 1), 'VALID'),  # im2col
    ((2, 11, 11, 3), (5, 5, 3, 2), (2, 2), 'SAME'),  # im2col, strided and padded
    ((2, 10, 10, 2), (3, 3, 2, 4), (2, 2), ((1, 0), (2, 1))),
    ((2, 8, 8, 6), (1, 1, 6, 3), (2, 2), 'SAME'),
    ((48, 32, 32, 3), (5, 5, 3, 6), (1, 1), 'VALID'),  # im2col from gathered patches
    # Wider images: oneDNN's input gradient on NHWC (narrower ones take its blocked layout).
    ((2, 9, 9, 12), (3, 3, 12, 16), (1, 1), 'SAME'),
    ((2, 10, 10, 8), (3, 3, 8, 5), (2, 2), 'VALID'),  # the last row and column in no window
    ((2, 10, 10, 3), (3, 3, 3, 4), (2, 2), 'VALID'),  # the same, blocked
    # Big enough to split by batch over XLA's threads: 3 uneven shares, blocked input gradient;
    # 2 shares, strided, the last row and column in no window.
    ((131, 16, 16, 4), (3, 3, 4, 8), (1, 1), 'SAME'),
    ((70, 12, 12, 8), (3, 3, 8, 16), (2, 2), 'VALID'),
]


NHWC = ('NHWC', 'HWIO', 'NHWC')


def _xla(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


def _fast(x, kernel, strides, padding):
  return ops.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


@pytest.fixture
def without_onednn(monkeypatch):
  """The patch-and-matmul convolutions, which run where oneDNN does not (read at trace time)."""
  monkeypatch.setenv('JAXMODEL_ONEDNN', '0')


def test_onednn_is_built_here():
  # CI's machines are x86-64 Linux with a compiler: the oneDNN path must not silently fall back.
  assert onednn.available()


@pytest.mark.parametrize('path', ['onednn', 'patches'])
@pytest.mark.parametrize('x_shape,k_shape,strides,padding', CASES)
def test_values_and_gradients_match_xla(x_shape, k_shape, strides, padding, path, monkeypatch):
  if path == 'patches':
    monkeypatch.setenv('JAXMODEL_ONEDNN', '0')
  rng = np.random.default_rng(0)
  x, kernel = rng.normal(size=x_shape), rng.normal(size=k_shape)

  def loss(conv):
    def f(x, kernel):
      y = conv(x, kernel, strides, padding)
      return jnp.sum(jnp.sin(y)), y
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

  (_, y), grads = loss(_fast)(jnp.float32(x), jnp.float32(kernel))
  with jax.enable_x64():  # the reference in float64: both float32 paths round, differently
    (_, ref_y), ref_grads = jax.tree.map(np.asarray,
                                         loss(_xla)(jnp.float64(x), jnp.float64(kernel)))
  for leaf, reference in zip(jax.tree.leaves((y, grads)), jax.tree.leaves((ref_y, ref_grads))):
    # Float32 error grows with the sums' lengths (up to 37,632 terms here): scale by magnitude.
    chex.assert_trees_all_close(leaf, reference.astype(np.float32), rtol=1e-5,
                                atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize('x_shape,k_shape,strides,padding', CASES)
def test_gathered_patches_equal_concatenated_patches(x_shape, k_shape, strides, padding):
  x = jnp.asarray(np.random.default_rng(1).normal(size=x_shape), jnp.float32)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x_shape[1:3], k_shape[:2], strides, padding)
  args = (k_shape[:2], strides, tuple(tuple(p) for p in padding))
  gathered = lambda x: ops._gathered_patches(x, x.shape, *args)
  concatenated = lambda x: ops._patches_by_concat(x, *args)
  patches, gathered_vjp = jax.vjp(gathered, x)
  ref_patches, concatenated_vjp = jax.vjp(concatenated, x)
  chex.assert_trees_all_equal(patches, ref_patches)
  cotangent = jnp.asarray(np.random.default_rng(2).normal(size=patches.shape), jnp.float32)
  chex.assert_trees_all_close(gathered_vjp(cotangent), concatenated_vjp(cotangent), rtol=1e-6)


_SPLIT_RUN = '''
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from jax import lax
from jaxmodel import onednn, ops
x_shape, k_shape = (131, 16, 16, 4), (3, 3, 4, 8)
assert onednn.available()
assert onednn._threads(np.zeros(x_shape), np.zeros(k_shape)) == 0  # split, not on one thread
pool_hlo = jax.jit(lambda y, b: ops.bias_relu_max_pool(y, b, (2, 2))).lower(
    jnp.zeros((131, 16, 16, 8)), jnp.zeros(8)).as_text()
assert 'jaxmodel_pool_forward' in pool_hlo and 'threads = 0 : i64' in pool_hlo  # split too
rng = np.random.default_rng(0)
x, kernel = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x_shape, k_shape))
pads = ((1, 1), (1, 1))
bias = jnp.asarray(rng.normal(size=8), jnp.float32)
def loss(conv):
  return jax.jit(jax.value_and_grad(lambda x, k, b: jnp.sum(jnp.sin(conv(x, k, b))),
                                    argnums=(0, 1, 2)))
# Each convolution, and the pooling after it, split in shares.
fast = loss(lambda x, k, b: ops.bias_relu_max_pool(onednn.conv(x, k, (1, 1), pads), b, (2, 2)))
xla = loss(lambda x, k, b: nn.max_pool(nn.relu(lax.conv_general_dilated(
    x, k, (1, 1), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b), (2, 2), (2, 2)))
first, again, reference = fast(x, kernel, bias), fast(x, kernel, bias), xla(x, kernel, bias)
same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)))
error = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(reference)))
print(same, error)
'''


def test_a_convolution_split_over_four_threads_matches_xla():
  # PJRT_NPROC=4: XLA's pool has 4 threads whatever this machine's cores, so the batch of 131
  # goes out in 4 shares, claimed by whichever thread is free, in the convolution and in the
  # pooling after it; the kernel's and the bias's gradients sum them in share order, so two runs
  # agree to the bit.
  env = {**os.environ, 'PJRT_NPROC': '4', 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', _SPLIT_RUN], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  same, error = result.stdout.split()
  assert same == 'True'
  assert float(error) < 1e-5


def test_large_narrow_inputs_take_the_gather():
  hlo = lambda shape: jax.jit(lambda x: ops._patches(x, (5, 5), (1, 1), ((0, 0), (0, 0)))).lower(
      jnp.zeros(shape)).as_text()
  assert 'gather' in hlo((48, 32, 32, 3))
  assert 'gather' not in hlo((4, 32, 32, 3)) and 'gather' not in hlo((48, 32, 32, 8))


@pytest.mark.parametrize('k_shape', [(5, 5, 3, 6), (3, 3, 3, 6)])
def test_a_symbolic_batch_exports(k_shape):
  # jax.export with a symbolic batch: size rules cannot compare it, so the convolution and the
  # pooling take the plain paths.
  kernel = jnp.asarray(np.random.default_rng(0).normal(size=k_shape), jnp.float32)
  bias = jnp.linspace(-1, 1, 6)
  stage = lambda conv, x: nn.max_pool(nn.relu(conv(x, kernel, (1, 1), 'SAME') + bias), (2, 2),
                                      (2, 2))
  fast = jax.jit(lambda x: ops.bias_relu_max_pool(_fast(x, kernel, (1, 1), 'SAME'), bias, (2, 2)))
  batch, = jax.export.symbolic_shape('b')
  exported = jax.export.export(fast)(jax.ShapeDtypeStruct((batch, 8, 8, 3), jnp.float32))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 8, 8, 3)), jnp.float32)
  chex.assert_trees_all_close(exported.call(x), stage(_xla, x), rtol=1e-5, atol=1e-5)


def _custom_calls(hlo):
  return [target for target in onednn._TARGETS if f'jaxmodel_{target}' in hlo]


def test_cpu_convolutions_run_on_onednn():
  loss = lambda x, k: jnp.sum(jnp.sin(_fast(x, k, (1, 1), 'SAME')))
  args = jnp.ones((2, 9, 9, 16)), jnp.ones((3, 3, 16, 16))
  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
  assert _custom_calls(hlo) == ['conv_forward', 'conv_input_grad', 'conv_kernel_grad']
  assert 'convolution(' not in hlo
  with ops.portable():  # e.g. jax.export: no library kernels in programs saved to run elsewhere
    hlo = jax.jit(loss).lower(*args).as_text()
  assert not _custom_calls(hlo) and 'convolution' in hlo
  half = jax.jit(loss).lower(*[a.astype(jnp.bfloat16) for a in args]).as_text()
  assert not _custom_calls(half)  # float32 only: other dtypes take the other paths
  strided_1x1 = jax.jit(lambda x, k: _fast(x, k, (2, 2), 'SAME')).lower(
      jnp.ones((2, 8, 8, 6)), jnp.ones((1, 1, 6, 3))).as_text()
  assert not _custom_calls(strided_1x1)  # see onednn.supports


def test_narrow_images_get_their_input_gradient_in_onednns_layout(monkeypatch):
  def blocked_flags(channels):
    loss = lambda x, k: jnp.sum(jnp.sin(_fast(x, k, (1, 1), 'SAME')))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        jnp.ones((2, 9, 9, channels)), jnp.ones((3, 3, channels, 16))).compile().as_text()
    calls = re.findall(r'custom_call_target="jaxmodel_conv_(\w+)".*blocked = (\w+)', hlo)
    return dict(calls)
  assert blocked_flags(6) == {'forward': 'false', 'input_grad': 'true', 'kernel_grad': 'false'}
  assert set(blocked_flags(8).values()) == {'false'}
  monkeypatch.setenv('JAXMODEL_ONEDNN_BLOCKED', '0')  # read at trace time
  assert set(blocked_flags(6).values()) == {'false'}


def test_the_flops_of_onednn_convolutions_are_counted():
  x, kernel = jnp.ones((2, 9, 9, 4)), jnp.ones((3, 3, 4, 5))
  loss = lambda x, k: jnp.sum(jnp.sin(_fast(x, k, (2, 2), 'SAME')))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
  # Forward, input and kernel gradients: each 2 x (outputs 2x5x5x5) x (3x3x4 products per output).
  assert onednn.flops(hlo) == 3 * 2 * (2 * 5 * 5 * 5) * (3 * 3 * 4)
  # Stride 1 to 5 channels: the forward pass and the kernel gradient in column pairs.
  x = jnp.ones((2, 8, 8, 4))
  hlo = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(_fast(x, k, (1, 1), 'SAME'))),
                         argnums=(0, 1))).lower(x, kernel).compile().as_text()
  paired = [line for line in hlo.splitlines()
            if 'custom-call' in line and 'paired_columns/' in line]
  assert len(paired) == 2
  assert onednn.flops(hlo) == 3 * 2 * (2 * 8 * 8 * 5) * (3 * 3 * 4)


def test_onednn_convolutions_vmap():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(3, 2, 7, 7, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
  conv = lambda conv_fn: jax.jit(jax.vmap(lambda x: conv_fn(x, kernel, (1, 1), 'SAME')))
  chex.assert_trees_all_close(conv(_fast)(x), conv(_xla)(x), rtol=1e-5, atol=1e-5)


def test_the_cpu_backward_pass_is_the_patch_matmul(without_onednn):
  x = jnp.ones((2, 12, 12, 3))
  kernel = jnp.ones((3, 3, 3, 4))
  grad_fn = jax.jit(jax.grad(lambda k: jnp.sum(_fast(x, k, (1, 1), 'SAME'))))
  hlo = grad_fn.lower(kernel).compile().as_text()
  # XLA's own weight gradient is a convolution of the input with the output gradient; ours is a
  # dot (the forward and input-gradient convolutions are not needed here and are pruned).
  assert 'convolution(' not in hlo and 'dot(' in hlo


def test_other_convolutions_fall_back_to_xla():
  x = jnp.ones((1, 6, 6, 4))
  kernel = jnp.ones((3, 3, 2, 4))  # grouped
  y = ops.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=NHWC,
                               feature_group_count=2)
  chex.assert_trees_all_close(y, lax.conv_general_dilated(
      x, kernel, (1, 1), 'SAME', dimension_numbers=NHWC, feature_group_count=2))


def test_small_outputs_run_as_matmuls_on_cpu(without_onednn):
  loss = lambda x, k: jnp.sum(jnp.sin(_fast(x, k, (1, 1), 'SAME')))
  compiled = lambda x: jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
      x, jnp.ones((3, 3, 16, 16))).compile().as_text()
  assert 'convolution(' not in compiled(jnp.ones((2, 8, 8, 16)))  # 8x8 outputs: im2col
  assert 'convolution(' in compiled(jnp.ones((2, 9, 9, 16)))  # XLA's forward and input gradient


def test_large_kernels_run_as_matmuls_on_cpu(without_onednn):
  grad_fn = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(_fast(x, k, (1, 1), 'SAME'))),
                             argnums=(0, 1)))
  hlo = grad_fn.lower(jnp.ones((2, 8, 8, 3)), jnp.ones((5, 5, 3, 4))).compile().as_text()
  assert 'convolution(' not in hlo and 'dot(' in hlo  # forward and both gradients


@pytest.mark.parametrize('shape,window', [((2, 8, 8, 3), (2, 2)), ((2, 15, 15, 4), (2, 2)),
                                          ((1, 9, 12, 2), (3, 3))])
def test_max_pool_matches_flax(shape, window):
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  pools = {'fast': lambda x: ops.max_pool(x, window, window),
           'flax': lambda x: nn.max_pool(x, window, window)}
  outs = {k: jax.jit(jax.value_and_grad(lambda x: jnp.sum(jnp.sin(3 * f(x))))) (x)
          for k, f in pools.items()}
  chex.assert_trees_all_close(outs['fast'], outs['flax'], rtol=1e-6, atol=1e-6)
  hlo = jax.jit(jax.grad(lambda x: jnp.sum(ops.max_pool(x, window, window)))).lower(
      x).compile().as_text()
  assert 'select-and-scatter' not in hlo and 'reduce-window' not in hlo
  overlapping = ops.max_pool(x, (3, 3), (1, 1), 'SAME')  # not a reshape: Flax's own
  chex.assert_trees_all_close(overlapping, nn.max_pool(x, (3, 3), (1, 1), 'SAME'))


def test_max_pool_shares_the_gradient_of_tied_maxima_as_jax_does():
  # Ties are common: ReLU zeros, flat image regions through airbench's identity-initialized convs.
  x = jnp.asarray(np.random.default_rng(0).integers(0, 3, size=(2, 6, 6, 3)), jnp.float32)
  loss = lambda pool: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(pool(x)))))
  plain = lambda x: x.reshape(2, 3, 2, 3, 2, 3).max(axis=(2, 4))  # JAX's own max and gradient
  chex.assert_trees_all_equal(loss(lambda x: ops.max_pool(x, (2, 2), (2, 2)))(x), loss(plain)(x))


POOL_CASES = [  # images (B, H, W, C), window
    ((2, 8, 8, 6), (2, 2)),
    ((3, 15, 13, 5), (2, 3)),  # the last row and column in no window
    ((2, 9, 9, 16), (3, 3)),
    ((90, 28, 28, 6), (2, 2)),  # big enough to split over XLA's threads
]


def _bias_relu_pools(window):
  """jaxmodel's fused bias, relu and pooling, and Flax's, as sum(sin(.)) with both gradients."""
  pools = {'fast': lambda x, b: ops.bias_relu_max_pool(x, b, window),
           'flax': lambda x, b: nn.max_pool(nn.relu(x + b), window, window)}
  return {k: jax.jit(jax.value_and_grad(lambda x, b: jnp.sum(jnp.sin(3 * f(x, b))),
                                        argnums=(0, 1)))
          for k, f in pools.items()}


@pytest.mark.parametrize('shape,window', POOL_CASES)
def test_bias_relu_max_pool_matches_flax(shape, window):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  bias = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
  pools = _bias_relu_pools(window)
  (value, (x_grad, bias_grad)), (ref_value, (ref_x_grad, ref_bias_grad)) = (
      pools['fast'](x, bias), pools['flax'](x, bias))
  chex.assert_trees_all_close(value, ref_value, rtol=1e-6)
  chex.assert_trees_all_equal(x_grad, ref_x_grad)  # each element's gradient: the same division
  chex.assert_trees_all_close(bias_grad, ref_bias_grad, rtol=1e-5, atol=1e-5)  # summed apart
  hlo = jax.jit(jax.value_and_grad(lambda x, b: jnp.sum(ops.bias_relu_max_pool(x, b, window)),
                                   argnums=(0, 1))).lower(x, bias).compile().as_text()
  assert 'jaxmodel_pool_forward' in hlo and 'jaxmodel_pool_backward' in hlo
  assert 'select-and-scatter' not in hlo and 'reduce-window' not in hlo


def test_bias_relu_max_pool_shares_tied_gradients_and_keeps_nans():
  # Ties: ReLU's zeros, and equal values in a window, share its gradient as JAX's max does.
  x = jnp.asarray(np.random.default_rng(0).integers(-2, 3, size=(3, 6, 6, 4)), jnp.float32)
  bias = jnp.asarray([0.0, 1.0, -1.0, 0.5])
  loss = lambda pool: jax.jit(jax.grad(lambda x, b: jnp.sum(jnp.sin(pool(x, b))), argnums=(0, 1)))
  plain = lambda x, b: nn.relu(x + b).reshape(3, 3, 2, 3, 2, 4).max(axis=(2, 4))  # JAX's own
  fast = lambda x, b: ops.bias_relu_max_pool(x, b, (2, 2))
  (x_grad, bias_grad), (ref_x_grad, ref_bias_grad) = loss(fast)(x, bias), loss(plain)(x, bias)
  chex.assert_trees_all_equal(x_grad, ref_x_grad)
  chex.assert_trees_all_close(bias_grad, ref_bias_grad, rtol=1e-6)
  nan = x.at[1, 2, 3, 0].set(jnp.nan)  # a NaN is its window's maximum, as in lax.max
  chex.assert_trees_all_equal(jax.jit(fast)(nan, bias),
                              nn.max_pool(nn.relu(nan + bias), (2, 2), (2, 2)))
  assert jnp.isnan(jax.jit(fast)(nan, bias)[1, 1, 1, 0])


def test_bias_relu_max_pool_vmaps():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 8, 8, 4)), jnp.float32)
  bias = jnp.arange(4.0) / 4
  per_example = jax.vmap(lambda x: ops.bias_relu_max_pool(x, bias, (2, 2)))(x)
  chex.assert_trees_all_equal(per_example, nn.max_pool(nn.relu(x + bias).reshape(6, 8, 8, 4),
                                                       (2, 2), (2, 2)).reshape(3, 2, 4, 4, 4))


@pytest.mark.parametrize('name,kwargs', [('resnet', {'stage_sizes': (1, 1), 'width': 4}),
                                         ('airbench', {'widths': (8, 8, 16), 'whiten_stride': 2}),
                                         ('seed_cnn', {})])
@pytest.mark.parametrize('path', ['onednn', 'patches'])
def test_models_train_the_same_with_xla_convolutions(name, kwargs, path, monkeypatch):
  if path == 'patches':
    monkeypatch.setenv('JAXMODEL_ONEDNN', '0')
  from jaxmodel import cross_entropy_loss, get_model
  model = get_model(name, **kwargs)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)

  def grads():  # traced afresh each call, so the environment switch takes effect
    def loss(params):
      logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                              mutable=['batch_stats'])
      return jnp.mean(cross_entropy_loss(logits, jnp.arange(4)))
    return jax.jit(jax.grad(loss))(variables['params'])

  fast = grads()
  monkeypatch.setenv('JAXMODEL_XLA_CONV', '1')
  chex.assert_trees_all_close(fast, grads(), rtol=2e-4, atol=2e-5)


def test_ab_step_builds_each_variant_under_its_own_environment(monkeypatch):
  # scripts/ab_step.py's A/B figures rest on this: a variant's switches reach its own trace only.
  monkeypatch.delenv('JAXMODEL_ONEDNN', raising=False)
  monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), '..', 'scripts'))
  import ab_step
  import benchmark
  spec = benchmark.model_spec('seed_cnn')
  without, *_ = ab_step.build(spec, 4, {'env': {'JAXMODEL_ONEDNN': '0'}})
  assert 'JAXMODEL_ONEDNN' not in os.environ
  with_onednn, *_ = ab_step.build(spec, 4, {})
  assert not _custom_calls(without.as_text())
  assert _custom_calls(with_onednn.as_text()) == [
      'conv_forward', 'conv_input_grad', 'conv_kernel_grad', 'pool_forward', 'pool_backward']
