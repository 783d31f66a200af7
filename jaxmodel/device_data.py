"""Training data held on the device: whole splits in memory, batches made inside the compiled step.

A split that fits in device memory (CIFAR-10's 45,000 training images are 138 MB as uint8) is
read once. Each step then gathers its batch through the epoch's permutation and augments it on
the device, inside the same jitted program as the train step: no input pipeline to wait for and
no host round trip per step, which is what small models at small batches are bound by.

The batch of step t is a pure function of (seed, t): epoch e's order comes from the seed and e,
step t's augmentation from the seed and t. So the step number is the whole iterator state, and a
resumed run sees exactly the batches an uninterrupted one would.
"""

import dataclasses
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Independent streams derived from the run's seed.
_ORDER, _AUGMENT, _FIRST_FLIP = range(3)


@dataclasses.dataclass(frozen=True)
class Augment:
  """Device-side augmentation and normalization of uint8 image batches.

  Crops translate by up to `crop_padding` pixels (pad with zeros or by reflection, crop back).
  Flips are random every time or, with `alternating_flip` (airbench's), random per example in
  epoch 0 and inverted on every odd epoch, so each example is seen both ways every two epochs.
  """
  mean: Sequence[float]
  std: Sequence[float]
  crop_padding: int = 0
  pad_mode: str = 'constant'  # or 'reflect'
  flip: bool = False
  alternating_flip: bool = False

  def normalize(self, images: jax.Array) -> jax.Array:
    mean = 255 * jnp.asarray(self.mean, jnp.float32)
    return (images.astype(jnp.float32) - mean) / (255 * jnp.asarray(self.std, jnp.float32))

  def __call__(self, images: jax.Array, indices: jax.Array, epoch: jax.Array, step: jax.Array,
               key: jax.Array) -> jax.Array:
    """`images` (uint8; examples `indices` of the split) augmented for `step` of `epoch`."""
    crop_key, flip_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, _AUGMENT),
                                                             step))
    if self.crop_padding:
      p = self.crop_padding
      n, h, w, c = images.shape
      padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode=self.pad_mode)
      offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * p + 1)
      crop = lambda image, dy, dx: jax.lax.dynamic_slice(image, (dy, dx, 0), (h, w, c))
      images = jax.vmap(crop)(padded, offsets[:, 0], offsets[:, 1])
    if self.flip:
      if self.alternating_flip:
        first_key = jax.random.fold_in(key, _FIRST_FLIP)
        first = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(first_key, i)))(indices)
        flips = first ^ (epoch % 2 == 1)
      else:
        flips = jax.random.bernoulli(flip_key, shape=images.shape[:1])
      images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
    return self.normalize(images)


@dataclasses.dataclass(frozen=True)
class TrainBatches:
  """The batches of a split held on the device; pure functions of the step, safe inside jit.

  Each epoch is a fresh permutation with its last partial batch dropped, as in the Grain pipeline.
  Call `permutation(epoch)` once per epoch (jitted) and `batch(...)` inside the train step.
  """
  num_examples: int
  batch_size: int
  seed: int
  augment: Augment

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.batch_size

  def _key(self) -> jax.Array:
    return jax.random.key(self.seed)

  def permutation(self, epoch: jax.Array) -> jax.Array:
    """The order of `epoch`'s examples."""
    key = jax.random.fold_in(jax.random.fold_in(self._key(), _ORDER), epoch)
    return jax.random.permutation(key, self.num_examples)

  def batch(self, arrays: dict, permutation: jax.Array, step: jax.Array) -> dict:
    """The batch of `step` from `arrays` ('image' uint8, 'label'), given its epoch's permutation."""
    epoch, position = jnp.divmod(step, self.steps_per_epoch)
    indices = jax.lax.dynamic_slice_in_dim(permutation, position * self.batch_size,
                                           self.batch_size)
    images = self.augment(arrays['image'][indices], indices, epoch, step, self._key())
    return {'image': images, 'label': arrays['label'][indices]}

  def from_inputs(self, inputs: dict, step: jax.Array) -> dict:
    """The batch of `step` from what StepInputs yields; call it inside the train step."""
    return self.batch(inputs['arrays'], inputs['permutation'], step)


class StepInputs:
  """The iterator the loop draws from: per step, the split's arrays and its epoch's permutation.

  Like the Grain pipeline's iterator, but with nothing to checkpoint: its position is the step.
  """

  def __init__(self, batches: TrainBatches, arrays: dict, step: int):
    self.batches, self.arrays, self.step = batches, arrays, step
    self._permute = jax.jit(batches.permutation)
    self._epoch, self._permutation = None, None

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    epoch = self.step // self.batches.steps_per_epoch
    if epoch != self._epoch:
      # Placed like the arrays, as the compiled step expects its inputs.
      permutation = jax.device_put(self._permute(epoch), self.arrays['label'].sharding)
      self._epoch, self._permutation = epoch, permutation
    self.step += 1
    return {'arrays': self.arrays, 'permutation': self._permutation}


def augment_from_config(config: Any) -> Augment:
  return Augment(mean=tuple(config.data.mean), std=tuple(config.data.std),
                 crop_padding=config.data.crop_padding, pad_mode=config.data.pad_mode,
                 flip=config.data.flip, alternating_flip=config.data.alternating_flip)


def eval_batches(arrays: dict, augment: Augment, batch_size: int) -> Iterator[dict]:
  """Every example of host `arrays` once, in batches of exactly `batch_size` with a 'mask'.

  The last batch is padded with its last example (mask 0 there), as data.eval_batches does.
  """
  mean = 255 * np.asarray(augment.mean, np.float32)
  scale = 1 / (255 * np.asarray(augment.std, np.float32))
  n = len(arrays['label'])
  for start in range(0, n, batch_size):
    positions = np.arange(start, start + batch_size)
    index = np.minimum(positions, n - 1)
    yield {'image': (arrays['image'][index].astype(np.float32) - mean) * scale,
           'label': arrays['label'][index], 'mask': positions < n}
