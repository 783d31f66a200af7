"""Models: Flax linen modules used as pure functions, chosen by name.

Every model is called the same way:
  variables = model.init(rng, images, train=False)
  logits = model.apply(variables, images, train=..., rngs={'dropout': key}, mutable=[...])
Images are NHWC float arrays; `variables['params']` trains, other collections (BatchNorm
statistics in 'batch_stats') are model state updated by the train step.
"""

from typing import Any, Callable, Sequence
import functools

import flax.linen as nn
from flax.linen import linear
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodel import ops
from jaxmodel.transformer import GPT, ViT

# Every model's convolutions: XLA's on GPU/TPU, a faster weight gradient on CPU (see ops.py).
Conv = functools.partial(nn.Conv, conv_general_dilated=ops.conv_general_dilated)


class ConvReluPool(nn.Module):
  """`nn.Conv` (VALID) then relu and max pooling by non-overlapping `window`s.

  Its parameters are nn.Conv's, 'kernel' (HWIO) and 'bias', initialized as nn.Conv does. On CPU
  the bias, relu and pooling run as one pass each way (ops.bias_relu_max_pool).
  """
  features: int
  kernel_size: tuple[int, int]
  window: tuple[int, int] = (2, 2)

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', linear.default_kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)  # as nn.Conv does
    y = ops.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return ops.bias_relu_max_pool(y, bias, self.window)


class SeedCNN(nn.Module):
  """The PyTorch CIFAR-10 tutorial net: conv 3->6 k5, pool, conv 6->16 k5, pool, fc 400-120-84.

  `dropout` (0 in the tutorial) applies after each hidden fully connected layer.
  """
  num_classes: int = 10
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)
    x = ConvReluPool(6, (5, 5), name='Conv_0')(x)
    x = ConvReluPool(16, (5, 5), name='Conv_1')(x)
    x = x.reshape(x.shape[0], -1)
    x = drop(nn.relu(nn.Dense(120)(x)))
    x = drop(nn.relu(nn.Dense(84)(x)))
    return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
  """A multilayer perceptron on flattened images, with optional dropout."""
  num_classes: int = 10
  hidden: Sequence[int] = (512, 256)
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class ResidualBlock(nn.Module):
  """The ResNet basic block: two 3x3 convs with BatchNorm and an identity or 1x1 shortcut."""
  width: int
  stride: int = 1
  norm_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                axis_name=self.norm_axis_name)
    y = Conv(self.width, (3, 3), (self.stride, self.stride), use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = Conv(self.width, (3, 3), use_bias=False)(y)
    # Zero-init of the last BatchNorm scale makes each block start as the identity.
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9, scale_init=nn.initializers.zeros,
                     axis_name=self.norm_axis_name)(y)
    if x.shape != y.shape:
      x = Conv(self.width, (1, 1), (self.stride, self.stride), use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A CIFAR ResNet (3x3 stem, no stem pooling): stage_sizes (2, 2, 2, 2) is ResNet-18,
  (3, 4, 6, 3) ResNet-34."""
  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  dropout: float = 0.0
  # A mapped axis (shard_map) over which BatchNorm averages its batch statistics; None: local.
  norm_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(self.width, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             axis_name=self.norm_axis_name)(x))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(self.width * 2**stage, stride, self.norm_axis_name)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def dirac_init(base: Callable = nn.initializers.lecun_normal()) -> Callable:
  """The default init with the first in-channels filters set to identity (airbench's trick)."""
  def init(key, shape, dtype=jnp.float32):
    kernel = base(key, shape, dtype)
    kh, kw, c_in, c_out = shape
    n = min(c_in, c_out)
    identity = jnp.zeros((kh, kw, c_in, n), dtype).at[kh // 2, kw // 2].set(jnp.eye(c_in, n, dtype=dtype))
    return kernel.at[..., :n].set(identity)
  return init


class ConvGroup(nn.Module):
  """airbench's group: conv, maxpool 2, BatchNorm, GELU, conv, BatchNorm, GELU."""
  width: int
  norm_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    # Frozen scale (use_scale=False), tiny eps and fast statistics follow the airbench recipe.
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.6, epsilon=1e-12,
                                use_scale=False, axis_name=self.norm_axis_name)
    x = Conv(self.width, (3, 3), use_bias=False, kernel_init=dirac_init())(x)
    x = ops.max_pool(x, (2, 2), (2, 2))
    x = nn.gelu(norm()(x))
    x = Conv(self.width, (3, 3), use_bias=False, kernel_init=dirac_init())(x)
    return nn.gelu(norm()(x))


class Airbench(nn.Module):
  """The airbench94 network: a 2x2 whitening stem, three conv groups and a max-pooled linear head.

  The stem's kernel is meant to be set from data with `whitening_kernel` and frozen through the
  optimizer (an lr multiplier of 0 on 'whiten/kernel').
  """
  num_classes: int = 10
  widths: Sequence[int] = (64, 256, 256)
  whiten_width: int = 24
  whiten_stride: int = 1  # 2 makes the stem a lossless-ish space-to-depth: 4x fewer FLOPs after it
  head_scale: float = 1 / 9
  norm_axis_name: str | None = None  # as in ResNet

  @nn.compact
  def __call__(self, x, train: bool = False):
    stride = (self.whiten_stride, self.whiten_stride)
    x = nn.gelu(Conv(self.whiten_width, (2, 2), stride, padding='VALID', name='whiten')(x))
    for width in self.widths:
      x = ConvGroup(width, self.norm_axis_name)(x, train)
    x = jnp.max(x, axis=(1, 2))
    return nn.Dense(self.num_classes, use_bias=False)(x) * self.head_scale


def whitening_kernel(images: np.ndarray, width: int = 24, eps: float = 5e-4) -> np.ndarray:
  """A 2x2 conv kernel that whitens image patches: eigenvectors of their covariance / sqrt(eig).

  Returns a (2, 2, C, width) kernel: width // 2 whitening filters and their negations.
  """
  images = np.asarray(images, np.float64)
  n, h, w, c = images.shape
  patches = np.stack([images[:, i:h - 1 + i, j:w - 1 + j] for i in (0, 1) for j in (0, 1)], axis=-2)
  patches = patches.reshape(-1, 4 * c)  # rows ordered (kh, kw, c) like a flax kernel
  eigenvalues, eigenvectors = np.linalg.eigh(np.cov(patches, rowvar=False))
  filters = eigenvectors[:, ::-1][:, :width // 2] / np.sqrt(eigenvalues[::-1][:width // 2] + eps)
  kernel = np.concatenate([filters, -filters], axis=1)
  return kernel.reshape(2, 2, c, width).astype(np.float32)


def init_from_data(model: nn.Module, params: Any, sample_images: Callable[[], np.ndarray]) -> Any:
  """`params` with any data-dependent initialization the model has (airbench's whitening stem).

  `sample_images()` returns normalized training images; it is called only if the model needs them.
  """
  if isinstance(model, Airbench):
    kernel = whitening_kernel(sample_images(), model.whiten_width)
    params = {**params, 'whiten': {**params['whiten'], 'kernel': jnp.asarray(kernel)}}
  return params


MODELS: dict[str, Callable[..., nn.Module]] = {
    'seed_cnn': SeedCNN,
    'mlp': MLP,
    'resnet': ResNet,
    'airbench': Airbench,
    'vit': ViT,
    'gpt': GPT,  # token ids in, per-token logits out: trains on text datasets (jaxmodel.text)
}


def get_model(name: str, **kwargs: Any) -> nn.Module:
  """The model registered under `name`, built with `kwargs` (e.g. num_classes, widths)."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; choose one of {sorted(MODELS)}')
  try:
    return MODELS[name](**kwargs)
  except TypeError as e:
    fields = sorted(f for f in MODELS[name].__dataclass_fields__ if f not in ('parent', 'name'))
    raise ValueError(f'model {name!r} got an unknown argument ({e}); it takes {fields}') from None


def count_params(params: Any) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
