"""Convolution and pooling that train faster on XLA:CPU, and XLA's own everywhere else.

XLA:CPU computes a convolution's weight gradient 4-10x slower than its forward pass, runs large
kernels over few channels (the tutorial CNN's 5x5 over 3 and 6) at a few GFLOP/s, and
differentiates max pooling through a slow select-and-scatter (measured in experiments/).
Drop-ins, chosen at lowering time by `lax.platform_dependent` (GPU and TPU keep XLA's ops):
- `conv_general_dilated` for `lax.conv_general_dilated` (pass it to
  `nn.Conv(conv_general_dilated=...)`). On CPU, plain NHWC/HWIO float32 convolutions run on
  oneDNN (jaxmodel.onednn) when it is built. Otherwise, and for other dtypes: kernels of at
  most 3x3 with outputs larger than 8x8 keep XLA's forward pass but compute the weight gradient
  as one matmul of image patches by the output gradient; larger kernels and smaller outputs run
  entirely as patches x kernel matmuls (im2col). `portable()` keeps library kernels out of a
  trace (for jax.export).
- `max_pool` for `nn.max_pool` with non-overlapping windows: a reshape and a max, whose gradient
  is a compare and a select (tied maxima share the gradient, as JAX's max does).
- `bias_relu_max_pool(x, bias, window)` for `nn.max_pool(nn.relu(x + bias), window, window)`: a
  convolution's bias, activation and pooling (models.ConvReluPool). On CPU for float32, one pass
  each way by jaxmodel/pool.cc, built with the oneDNN convolutions; its gradient is JAX's.
Set JAXMODEL_XLA_CONV=1 to use XLA's own convolution and pooling on CPU too (for comparisons),
JAXMODEL_ONEDNN=0 for the patch paths and the reshape pooling.
"""

import contextlib
import contextvars
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmodel import onednn

_NHWC = ('NHWC', 'HWIO', 'NHWC')
# Pooling of fewer elements runs on one thread: waking another costs more than it saves. The
# tutorial CNN's first pooling and its gradient took 330 us split and 260 on one thread at batch
# 32 (150k elements), 790 and 1040 at batch 128 (600k).
_POOL_SHARED_MIN_SIZE = 2**18


def _conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def _patches_by_concat(x, kernel_size, strides, padding):
  """(B, H', W', kh*kw*C) image patches ordered (kh, kw, C), like an HWIO kernel's first axes."""
  (kh, kw), (sh, sw) = kernel_size, strides
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  h, w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  # Columns, then rows: kh + kw wide copies instead of kh * kw narrow ones (C may be 3).
  x = jnp.concatenate([x[:, :, j:j + sw * (w - 1) + 1:sw] for j in range(kw)], axis=-1)
  return jnp.concatenate([x[:, i:i + sh * (h - 1) + 1:sh] for i in range(kh)], axis=-1)


def _patches(x, kernel_size, strides, padding):
  """`_patches_by_concat`, computed the faster way for x's size and channels."""
  # For fewer channels than one AVX2 vector (8 floats) the concatenation copies narrow pieces;
  # one gather of patch rows (kw * C contiguous floats each) made the tutorial CNN's step at batch
  # 128 1.09x faster (1.2x reading its batch on device). It was slower for small inputs (0.56x at
  # batch 4) and for wide channels (0.92x on the `cifar` net): only large, narrow inputs take it.
  size = x.size * kernel_size[0] * kernel_size[1]
  if x.shape[-1] >= 8 or not isinstance(size, int) or size < 2**20:  # not int: a symbolic batch
    return _patches_by_concat(x, kernel_size, strides, padding)
  return _gathered_patches(x, x.shape, kernel_size, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _gathered_patches(x, x_shape, kernel_size, strides, padding):
  (kh, kw), (sh, sw) = kernel_size, strides
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  b, hp, wp, c = x.shape
  h, w = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  index = lambda axis: lax.broadcasted_iota(jnp.int32, (b, h, w, kh, 1), axis)
  starts = jnp.concatenate(
      [index(0), index(1) * sh + index(3), index(2) * (sw * c)], axis=-1)
  dimensions = lax.GatherDimensionNumbers(
      offset_dims=(4,), collapsed_slice_dims=(0, 1), start_index_map=(0, 1, 2))
  rows = lax.gather(x.reshape(b, hp, wp * c), starts, dimensions, slice_sizes=(1, 1, kw * c),
                    mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
  return rows.reshape(b, h, w, kh * kw * c)


def _patches_forward(x, x_shape, kernel_size, strides, padding):
  return _gathered_patches(x, x_shape, kernel_size, strides, padding), None


def _patches_backward(x_shape, kernel_size, strides, padding, _, grad):
  # A gather's transpose is a scatter-add; the concatenation's (slices added into place) is faster.
  transpose = jax.linear_transpose(
      lambda x: _patches_by_concat(x, kernel_size, strides, padding),
      jax.ShapeDtypeStruct(x_shape, grad.dtype))
  return transpose(grad)


_gathered_patches.defvjp(_patches_forward, _patches_backward)


def _im2col_conv(x, kernel, strides, padding):
  """The convolution as one matmul of image patches by the kernel; autodiff gives matmuls too."""
  kh, kw, c_in, c_out = kernel.shape
  patches = _patches(x, (kh, kw), strides, padding)
  return (patches.reshape(-1, kh * kw * c_in) @ kernel.reshape(-1, c_out)).reshape(
      *patches.shape[:3], c_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _patch_matmul_conv(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, grad):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _conv(x, kernel, strides, padding), x)
  kh, kw, c_in, c_out = kernel.shape
  patches = _patches(x, (kh, kw), strides, padding).reshape(-1, kh * kw * c_in)
  kernel_grad = (patches.T @ grad.reshape(-1, c_out)).reshape(kernel.shape)
  return input_vjp(grad)[0], kernel_grad.astype(kernel.dtype)


_patch_matmul_conv.defvjp(_forward, _backward)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, with the fast CPU backward pass where it applies."""
  nhwc = lhs.ndim == 4 and (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
  plain = (nhwc and undilated and feature_group_count == 1 and batch_group_count == 1
           and preferred_element_type is None)
  xla = functools.partial(lax.conv_general_dilated, window_strides=window_strides,
                          padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                          dimension_numbers=dimension_numbers,
                          feature_group_count=feature_group_count,
                          batch_group_count=batch_group_count, precision=precision,
                          preferred_element_type=preferred_element_type)
  if not plain or os.environ.get('JAXMODEL_XLA_CONV') == '1':
    return xla(lhs, rhs)
  strides = tuple(window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  padding = tuple(tuple(p) for p in padding)
  # Measured here (experiments/): up to 3x3, XLA's forward and input gradient beat im2col's on
  # large maps (its patches are kh*kw times the input). On small maps they lose: XLA ran the
  # `cifar` net's 2x2 map as a generic convolution at 11 GFLOP/s, and im2col on outputs of at
  # most 8x8 made that net's step 1.3x faster, airbench94's 1.08x (ResNet-18 1.00x); 16x16 and
  # beyond lost on airbench94. On seed_cnn's 5x5 kernels im2col won everywhere.
  out_h, out_w = [(n + lo + hi - k) // st + 1 for n, k, st, (lo, hi)
                  in zip(lhs.shape[1:3], rhs.shape[:2], strides, padding)]
  small_output = isinstance(out_h * out_w, int) and out_h * out_w <= 64
  if _use_onednn(lhs, rhs, strides):
    fast = lambda x, k: onednn.conv(x, k, strides, padding)
  elif rhs.shape[0] * rhs.shape[1] <= 9 and not small_output:
    fast = lambda x, k: _patch_matmul_conv(x, k, strides, padding)
  else:
    fast = lambda x, k: _im2col_conv(x, k, strides, padding)
  return lax.platform_dependent(lhs, rhs, cpu=fast, default=xla)


_portable = contextvars.ContextVar('portable', default=False)


@contextlib.contextmanager
def portable():
  """Traces inside use no library kernels (oneDNN): for programs saved to run elsewhere."""
  token = _portable.set(True)
  try:
    yield
  finally:
    _portable.reset(token)


def _native_kernels() -> bool:
  """Whether this trace may call jaxmodel's compiled kernels (oneDNN's convolutions, pool.cc)."""
  # The switch first: `available` builds and loads the kernels, and remembers if it could not.
  return (not _portable.get() and os.environ.get('JAXMODEL_ONEDNN') != '0'
          and onednn.available())


def _use_onednn(lhs, rhs, strides) -> bool:
  return (lhs.dtype == rhs.dtype == jnp.float32 and onednn.supports(rhs.shape, strides)
          and all(isinstance(n, int) for n in lhs.shape)  # not a symbolic batch
          and _native_kernels())


def _reshape_max_pool(x, window):
  (wh, ww), (b, h, w, c) = window, x.shape
  x = x[:, :h - h % wh, :w - w % ww]  # what VALID pooling leaves out
  return _window_max(x.reshape(b, h // wh, wh, w // ww, ww, c))


@jax.custom_vjp
def _window_max(windows):
  """The max over axes 2 and 4 of windows (B, H', wh, W', ww, C)."""
  return windows.max(axis=(2, 4))


def _window_max_forward(windows):
  maxima = _window_max(windows)
  return maxima, (windows, maxima)


def _window_max_backward(residuals, grad):
  # JAX's own gradient of a max (tied maxima share it equally), with the ties counted by adding
  # the window's slices instead of a reduction: 1.19x the tutorial CNN's step at batch 128 here.
  windows, maxima = residuals
  window_axes = lambda a: a[:, :, None, :, None, :]
  is_max = windows == window_axes(maxima)
  count = sum(is_max[:, :, i, :, j].astype(grad.dtype)
              for i in range(windows.shape[2]) for j in range(windows.shape[4]))
  return (jnp.where(is_max, window_axes(grad / count), 0).astype(windows.dtype),)


_window_max.defvjp(_window_max_forward, _window_max_backward)


def _native_pool_call(name, results, *operands, window):
  small = operands[0].size < _POOL_SHARED_MIN_SIZE
  # 'sequential': under vmap, one call per example of the mapped axis.
  return jax.ffi.ffi_call(f'jaxmodel_{name}', results, vmap_method='sequential')(
      *operands, window=np.asarray(window, np.int64), threads=np.int64(1 if small else 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _native_bias_relu_max_pool(x, bias, window):
  (wh, ww), (b, h, w, c) = window, x.shape
  pooled = jax.ShapeDtypeStruct((b, h // wh, w // ww, c), x.dtype)
  return _native_pool_call('pool_forward', pooled, x, bias, window=window)


def _native_bias_relu_max_pool_forward(x, bias, window):
  return _native_bias_relu_max_pool(x, bias, window), (x, bias)


def _native_bias_relu_max_pool_backward(window, residuals, grad):
  x, bias = residuals
  as_struct = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  return tuple(_native_pool_call('pool_backward', (as_struct(x), as_struct(bias)), x, bias,
                                 grad, window=window))


_native_bias_relu_max_pool.defvjp(_native_bias_relu_max_pool_forward,
                                  _native_bias_relu_max_pool_backward)


def _non_overlapping(x, window_shape, strides, padding) -> bool:
  return (x.ndim == 4 and tuple(strides or (1, 1)) == tuple(window_shape) and padding == 'VALID'
          and os.environ.get('JAXMODEL_XLA_CONV') != '1')


def max_pool(x, window_shape, strides=None, padding='VALID'):
  """`nn.max_pool`, faster on CPU when windows do not overlap (strides == window, VALID, NHWC)."""
  xla = functools.partial(nn.max_pool, window_shape=window_shape, strides=strides,
                          padding=padding)
  if not _non_overlapping(x, window_shape, strides, padding):
    return xla(x)
  fast = functools.partial(_reshape_max_pool, window=tuple(window_shape))
  return lax.platform_dependent(x, cpu=fast, default=xla)


def _cpu_bias_relu_max_pool(x, bias, window):
  if (x.dtype == bias.dtype == jnp.float32 and _native_kernels()
      and all(isinstance(n, int) for n in x.shape)):  # not a symbolic batch
    return _native_bias_relu_max_pool(x, bias, window)
  return _reshape_max_pool(nn.relu(x + bias), window)


def bias_relu_max_pool(x, bias, window_shape):
  """`nn.max_pool(nn.relu(x + bias), window_shape, strides=window_shape)` for NHWC x and a bias
  of its channels: a convolution's bias, activation and pooling. On CPU, one pass each way."""
  xla = lambda x, bias: nn.max_pool(nn.relu(x + bias), window_shape, window_shape)
  if not _non_overlapping(x, window_shape, window_shape, 'VALID'):
    return xla(x, bias)
  fast = functools.partial(_cpu_bias_relu_max_pool, window=tuple(window_shape))
  return lax.platform_dependent(x, bias, cpu=fast, default=xla)
