"""Convolutions on CPU by oneDNN, the library PyTorch's CPU convolutions run on, through jax.ffi.

The models here trained 1.3-3.8x faster with them than with XLA:CPU's own convolutions, and one
large convolution's forward and backward passes ran 5.7x faster (experiments/README.md).
`conv(x, kernel, strides, padding)` computes the forward pass and both gradients with oneDNN
primitives: NHWC float32 images, an HWIO float32 kernel, no dilation, one group. It is called
from jitted code like any op; jaxmodel.ops chooses it on CPU.

The handlers (onednn_conv.cc next to this file, and pool.cc, the pooling that jaxmodel.ops
calls) are compiled once with the C++ compiler ($CXX, else g++) against jaxlib's FFI headers and
the oneDNN wheels (onednn-cpu-gomp and its -devel headers, dependencies on x86-64 Linux), and
kept in the user's cache dir. `available()` says whether that worked; if not, jaxmodel warns
once and uses XLA's convolutions. JAXMODEL_ONEDNN=0 turns both off; JAXMODEL_ONEDNN_BLOCKED=0
keeps every activation NHWC (to measure what the blocked input gradient below is worth). Both
are read at trace time.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import math
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmodel import compile_cache

_SOURCES = [pathlib.Path(__file__).with_name(name) for name in ('onednn_conv.cc', 'pool.cc')]
_HEADERS = [pathlib.Path(__file__).with_name('shares.h')]
_TARGETS = {'conv_forward': 'JaxmodelConvForward', 'conv_input_grad': 'JaxmodelConvInputGrad',
            'conv_kernel_grad': 'JaxmodelConvKernelGrad',
            'pool_forward': 'JaxmodelPoolForward', 'pool_backward': 'JaxmodelPoolBackward'}
_NHWC = ('NHWC', 'HWIO', 'NHWC')
_SHARED_MIN_MACS = 2**22
_BLOCKED_MAX_CHANNELS = 7
_PAIRED_MAX_CHANNELS = 8
_PAIRED_SCOPE = 'paired_columns'


def _package_dir(distribution: str, suffix: str) -> pathlib.Path:
  """The directory of the file ending in `suffix` that `distribution` installed."""
  for file in importlib.metadata.files(distribution) or ():
    if str(file).endswith(suffix):
      path = pathlib.Path(file.locate()).resolve()
      return path.parents[len(pathlib.PurePath(suffix).parts) - 1]
  raise FileNotFoundError(f'{distribution} has no {suffix}')


def _build() -> pathlib.Path:
  """The compiled handlers, built into the cache dir unless an identical build is there."""
  lib_dir = _package_dir('onednn-cpu-gomp', 'libdnnl.so')
  include_dir = _package_dir('onednn-devel-cpu-gomp', 'oneapi/dnnl/dnnl.hpp')
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not compiler:
    raise FileNotFoundError('no C++ compiler: install g++ or set CXX')
  # -O3: pool.cc's loops are written for the vectorizer, which -O2 mostly leaves off.
  command = [compiler, '-O3', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w',
             *map(str, _SOURCES), f'-I{jax.ffi.include_dir()}', f'-I{include_dir}',
             f'-L{lib_dir}', '-ldnnl', f'-Wl,-rpath,{lib_dir}']
  sources = [path.read_bytes() for path in _SOURCES + _HEADERS]
  key = hashlib.sha256(repr([sources, command, importlib.metadata.version('jaxlib'),
                             importlib.metadata.version('onednn-cpu-gomp')]).encode())
  path = pathlib.Path(compile_cache.cache_dir(), 'onednn', key.hexdigest()[:16],
                      'libjaxmodel_conv.so')
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f'.{os.getpid()}.tmp')  # concurrent builds each write their own
    done = subprocess.run([*command, '-o', str(temporary)], capture_output=True, text=True)
    if done.returncode != 0:
      errors = [line for line in done.stderr.splitlines() if 'error' in line] or ['(no message)']
      raise RuntimeError(f'{compiler} could not build the handlers: {errors[0].strip()}')
    os.replace(temporary, path)
  return path


@functools.cache
def available() -> bool:
  """Whether the oneDNN handlers are built and registered with JAX (built at the first call)."""
  if os.environ.get('JAXMODEL_ONEDNN') == '0':
    return False
  if not (sys.platform == 'linux' and platform.machine() == 'x86_64'):
    return False  # where the oneDNN wheels are dependencies
  try:
    library = ctypes.cdll.LoadLibrary(str(_build()))
  except (OSError, RuntimeError, ImportError) as error:
    warnings.warn(f'jaxmodel: oneDNN convolutions are off, XLA\'s run instead (slower on CPU): '
                  f'{error}. Set JAXMODEL_ONEDNN=0 to silence this.', stacklevel=2)
    return False
  for name, symbol in _TARGETS.items():
    handler = jax.ffi.pycapsule(getattr(library, symbol))
    jax.ffi.register_ffi_target(f'jaxmodel_{name}', handler, platform='cpu')
  return True


def supports(kernel_shape: tuple, strides: tuple) -> bool:
  """Whether `conv` is right for this kernel (HWIO) and strides."""
  # oneDNN 3.2's backward pass of a strided 1x1 convolution wrote past the end of the image
  # gradient (channels not a multiple of 8, NHWC): a heap corruption. Those stay with XLA.
  return not (kernel_shape[0] == kernel_shape[1] == 1 and any(s > 1 for s in strides))


def _threads(x, kernel) -> int:
  """1 for convolutions too small to share, else 0: split by batch over XLA's threads."""
  # Measured on 2 cores (experiments/README.md): the tutorial CNN's step at batch 4 ran 1.2x
  # faster with its convolutions on one thread, 0.89x on two; at batch 128 two were 1.3x faster.
  macs = x.size * kernel.shape[0] * kernel.shape[1] * kernel.shape[3]  # ~ the forward's, x stride^2
  return 1 if macs < _SHARED_MIN_MACS else 0


def _call(name: str, result: jax.ShapeDtypeStruct, *operands, strides, padding, threads,
          blocked=False):
  # 'sequential': under vmap, one call per example of the mapped axis.
  return jax.ffi.ffi_call(f'jaxmodel_conv_{name}', result, vmap_method='sequential')(
      *operands, strides=np.asarray(strides, np.int64), threads=np.int64(threads),
      blocked=bool(blocked),
      pad_lo=np.asarray([lo for lo, _ in padding], np.int64),
      pad_hi=np.asarray([hi for _, hi in padding], np.int64))


def _paired(kernel, strides) -> bool:
  # oneDNN's NHWC kernels vectorize over output channels (16 floats with AVX-512). A stride-1
  # convolution to few channels (the tutorial CNN's first: 6) is computed two output columns at
  # a time instead: a kernel one column wider with both columns' channels, at stride 2 in width.
  # Its output is the plain output's memory. In the tutorial CNN's step the kernel gradient ran
  # 1.45-1.77x faster at batch 4-512, the forward pass 1.0-2.4x, though the zero column adds
  # 20% to the work (experiments/README.md).
  return kernel.shape[3] <= _PAIRED_MAX_CHANNELS and tuple(strides) == (1, 1)


def _pair_padding(x, kernel, padding) -> tuple:
  """`padding`, one column more at the right end where the output has an odd width."""
  (top, bottom), (left, right) = padding
  width = x.shape[2] + left + right - kernel.shape[1] + 1
  return (top, bottom), (left, right + width % 2)


def _pair_kernel(kernel):
  """(kh, kw + 1, C, 2 C'): the kernel for an even output column, then for the odd one."""
  return jnp.concatenate([jnp.pad(kernel, ((0, 0), (0, 1), (0, 0), (0, 0))),
                          jnp.pad(kernel, ((0, 0), (1, 0), (0, 0), (0, 0)))], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, kernel: jax.Array, strides: tuple, padding: tuple) -> jax.Array:
  """`lax.conv_general_dilated(x, kernel, strides, padding)` for NHWC x and an HWIO kernel.

  `padding` is ((low, high), (low, high)). Call `available()` and `supports` first.
  """
  result = jax.eval_shape(
      lambda x, k: lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_NHWC),
      x, kernel)
  threads = _threads(x, kernel)
  if not _paired(kernel, strides):
    return _call('forward', result, x, kernel, strides=strides, padding=padding,
                 threads=threads)
  b, h, w, c = result.shape
  pairs = jax.ShapeDtypeStruct((b, h, (w + 1) // 2, 2 * c), result.dtype)
  with jax.named_scope(_PAIRED_SCOPE):  # for `flops`
    y = _call('forward', pairs, x, _pair_kernel(kernel), strides=(1, 2),
              padding=_pair_padding(x, kernel, padding), threads=threads)
  return y.reshape(b, h, -1, c)[:, :, :w]


def _forward(x, kernel, strides, padding):
  return conv(x, kernel, strides, padding), (x, kernel)


def _kernel_grad(x, kernel, grad, strides, padding, threads):
  as_struct = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  if not _paired(kernel, strides):
    return _call('kernel_grad', as_struct(kernel), x, grad, strides=strides, padding=padding,
                 threads=threads)
  b, h, w, c = grad.shape
  grad = jnp.pad(grad, ((0, 0), (0, 0), (0, w % 2), (0, 0))).reshape(b, h, -1, 2 * c)
  with jax.named_scope(_PAIRED_SCOPE):
    pairs = _call('kernel_grad', jax.eval_shape(_pair_kernel, kernel), x, grad, strides=(1, 2),
                  padding=_pair_padding(x, kernel, padding), threads=threads)
  return pairs[:, :-1, :, :c] + pairs[:, 1:, :, c:]  # _pair_kernel's transpose


def _backward(strides, padding, residuals, grad):
  x, kernel = residuals
  as_struct = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  threads = _threads(x, kernel)
  # Into an image of few channels, oneDNN's input gradient on NHWC takes a slow kernel: on its
  # own layout (channels padded to a block of 8) it ran 1.8x faster, reorders included, and the
  # tutorial CNN's step 1.04-1.11x (experiments/README.md). The forward pass and the kernel
  # gradient gained nothing once their reorders were paid.
  blocked = (x.shape[-1] <= _BLOCKED_MAX_CHANNELS
             and os.environ.get('JAXMODEL_ONEDNN_BLOCKED') != '0')
  return (_call('input_grad', as_struct(x), grad, kernel, strides=strides, padding=padding,
                threads=threads, blocked=blocked),
          _kernel_grad(x, kernel, grad, strides, padding, threads))


conv.defvjp(_forward, _backward)


_SHAPE = r'f32\[([\d,]*)\](?:\{[\d,]*\})?'
_CALL = re.compile(rf'= {_SHAPE} custom-call\([^)]*\), custom_call_target="jaxmodel_conv_(\w+)", '
                   rf'operand_layout_constraints=\{{{_SHAPE}, {_SHAPE}\}}')


def flops(hlo_text: str) -> int:
  """The FLOPs of the oneDNN convolutions in a compiled program's HLO text.

  XLA's cost analysis counts nothing for a custom call; add this to its 'flops'. A convolution
  computed in column pairs counts the model's FLOPs, not its kernel's zero column.
  """
  total = 0
  for line in hlo_text.splitlines():
    for result, target, first, second in _CALL.findall(line):
      output, kernel = {'forward': (result, second), 'input_grad': (first, second),
                        'kernel_grad': (second, result)}[target]
      dims = lambda text: [int(n) for n in text.split(',') if n]
      kh, kw, c_in, _ = dims(kernel)
      if f'/{_PAIRED_SCOPE}/' in line:
        kw -= 1
      total += 2 * math.prod(dims(output)) * kh * kw * c_in
  return total
