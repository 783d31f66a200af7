"""A convolution that trains faster on XLA:CPU, and XLA's own everywhere else.

XLA:CPU computes a convolution's weight gradient 4-10x slower than its forward pass (measured in
experiments/). `conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (pass it to
`nn.Conv(conv_general_dilated=...)`): on CPU, for plain NHWC/HWIO convolutions with kernels of
at most 3x3, its backward pass computes the weight gradient as one matmul of image patches by the
output gradient; GPU and TPU lower to XLA's convolution unchanged (`lax.platform_dependent` picks
at lowering time).
Set JAXMODEL_XLA_CONV=1 to use XLA's convolution on CPU too (for comparisons).
"""

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def _patches(x, kernel_size, strides, padding):
  """(B, H', W', kh*kw*C) image patches ordered (kh, kw, C), like an HWIO kernel's first axes."""
  (kh, kw), (sh, sw) = kernel_size, strides
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  h, w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  return jnp.concatenate([x[:, i:i + sh * (h - 1) + 1:sh, j:j + sw * (w - 1) + 1:sw]
                          for i in range(kh) for j in range(kw)], axis=-1)


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
  # Measured here: the patch matmul wins for 3x3 and smaller kernels; for seed_cnn's 5x5 ones
  # (25 taps over few channels) XLA's own backward was faster.
  undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
  plain = (nhwc and undilated and rhs.shape[0] * rhs.shape[1] <= 9 and feature_group_count == 1
           and batch_group_count == 1 and preferred_element_type is None)
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
  fast = lambda x, k: _patch_matmul_conv(x, k, strides, padding)
  return lax.platform_dependent(lhs, rhs, cpu=fast, default=xla)
