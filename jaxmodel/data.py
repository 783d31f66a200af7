"""Input pipelines: TFDS datasets read with random access (`tfds.data_source`) through Grain.

Train: a per-epoch seeded shuffle, batching, augmentation (random crop after zero padding,
horizontal flip) and per-channel normalization, each process reading only its share. Augmentation
runs on whole batches with numpy (per-image Python calls would cost more than the small models'
train steps), seeded per batch so the pipeline is deterministic and resumable from its state.
Eval: every example exactly once, the last batch padded and masked.
"""

import dataclasses
import functools
import os
from typing import Any, Callable, Iterator, Sequence

from absl import flags
import grain
import numpy as np


class DataError(ValueError):
  """A dataset that cannot be read as asked; its message is one line that says what to do."""


def default_data_dir(data_dir: str | None = None) -> str:
  return data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def open_split(name: str, split: str, data_dir: str | None = None,
               download: bool = False) -> tuple[Any, Any]:
  """The random-access source of `name[split]` and the dataset's tfds.core.DatasetInfo.

  With `download`, a TFDS catalog dataset not yet in `data_dir` is downloaded and prepared
  (array_record) first; that needs the internet.
  """
  import tensorflow_datasets as tfds  # imported here: it is slow and many callers never need it
  data_dir = default_data_dir(data_dir)
  prepare_hint = (f'prepare an image folder with `python -m jaxmodel.prepare PATH --name {name} '
                  f'--data_dir {data_dir}`, or pass --config.data_dir')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f'dataset {name!r} is not in {data_dir} nor in the TFDS catalog; '
                    f'{prepare_hint}') from None
  if not builder.is_prepared():
    if not download:
      raise DataError(f'dataset {name!r} is not prepared in {data_dir}; {prepare_hint}, or set '
                      f'--config.download=True on a machine with internet')
    try:
      builder.download_and_prepare(file_format='array_record')
    except Exception as e:  # any failure to fetch or build: network, disk, missing packages
      raise DataError(f'could not download and prepare {name!r} ({str(e).splitlines()[0][:200]}); '
                      f'{prepare_hint}') from None
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (ValueError, KeyError, AssertionError) as e:
    if _num_examples(builder.info, split) == 0:  # TFDS fails on empty slices with a vaguer message
      source = []
    else:
      splits = ', '.join(f'{s} ({v.num_examples})' for s, v in builder.info.splits.items())
      raise DataError(f'split {split!r} of {name!r} cannot be read ({str(e).splitlines()[0]}); '
                      f'its splits are {splits}, sliced like train[:90%]') from None
  if len(source) == 0:
    raise DataError(f'split {split!r} of {name!r} selects no examples; widen the slice')
  return source, builder.info


def _num_examples(info: Any, split: str) -> int | None:
  try:
    return info.splits[split].num_examples
  except (ValueError, KeyError):
    return None


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Batch-level augmentation and normalization; picklable, so it also runs in Grain workers."""
  mean: Sequence[float]
  std: Sequence[float]
  crop_padding: int = 0
  pad_mode: str = 'constant'  # or 'reflect'
  flip: bool = False

  def augment(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crops of the padded images, then random horizontal flips."""
    n, h, w, _ = images.shape
    if self.crop_padding:
      p = self.crop_padding
      padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode=self.pad_mode)
      dy, dx = rng.integers(0, 2 * p + 1, size=(2, n))
      # Every h x w window of every image, as a view; picking one per image copies only those.
      windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
      images = windows[np.arange(n), dy, dx].transpose(0, 2, 3, 1)  # (n, c, h, w) -> NHWC
    if self.flip:
      flips = rng.random(n) < 0.5
      if not self.crop_padding:  # flipped in place below: not the caller's array
        images = images.copy()
      images[flips] = images[flips, :, ::-1]
    return images

  def normalize(self, images: np.ndarray) -> np.ndarray:
    scale = 1 / (255 * np.asarray(self.std, np.float32))
    normalized = np.subtract(images, 255 * np.asarray(self.mean, np.float32), dtype=np.float32)
    normalized *= scale  # in place: two passes over the batch, no temporaries
    return normalized

  def train(self, batch: dict, rng: np.random.Generator) -> dict:
    return {'image': self.normalize(self.augment(batch['image'], rng)), 'label': batch['label']}

  def eval(self, batch: dict) -> dict:
    return {'image': self.normalize(batch['image']), 'label': batch['label']}


def _image_and_label(example: dict) -> dict:
  return {'image': np.asarray(example['image'], np.uint8),
          'label': np.asarray(example['label'], np.int32)}


def load_split(source: Any, read_batch: int = 250) -> dict[str, np.ndarray]:
  """Every example of a random-access image source: 'image' uint8 (N, H, W, C), 'label' int32 (N,)."""
  batches = (grain.MapDataset.range(len(source)).batch(read_batch)
             .map(functools.partial(_read_batch, source, _image_and_label))
             .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
  parts = list(batches)
  return {k: np.concatenate([p[k] for p in parts]) for k in ('image', 'label')}


class InMemory:
  """A split decoded once into host arrays (`load_split`), read by index like a TFDS source.

  For image data that fits in memory (CIFAR-10's 45,000 training images are 138 MB as uint8):
  batches are then slices of the arrays instead of every image decoded again every epoch, and
  they are the same batches, as the arrays hold exactly what decoding gives.
  """

  def __init__(self, source: Any):
    self.arrays = load_split(source)

  def __len__(self) -> int:
    return len(self.arrays['label'])

  def __getitem__(self, index: int) -> dict:
    return {k: v[index] for k, v in self.arrays.items()}

  def batch(self, indices: np.ndarray) -> dict:
    return {k: v[indices] for k, v in self.arrays.items()}


def _read_batch(source: Any, decode: Callable[[dict], dict], indices: np.ndarray) -> dict:
  """Examples `indices` of `source`, decoded and stacked.

  TFDS sources read a list of records in one call (`__getitems__`), 2x faster than one by one.
  """
  if isinstance(source, InMemory):  # decoded already
    return source.batch(np.asarray(indices))
  indices = [int(i) for i in indices]
  getitems = getattr(source, '__getitems__', None)
  examples = getitems(indices) if getitems else [source[i] for i in indices]
  decoded = [decode(example) for example in examples]
  return {k: np.stack([d[k] for d in decoded]) for k in decoded[0]}


def preprocess_from_config(config: Any, train: bool) -> Preprocess:
  return Preprocess(mean=tuple(config.data.mean), std=tuple(config.data.std),
                    crop_padding=config.data.crop_padding if train else 0,
                    pad_mode=config.data.pad_mode,
                    flip=config.data.flip and train)


def train_dataset(source: Any, preprocess: Preprocess, batch_size: int, *, seed: int,
                  process_index: int = 0, process_count: int = 1, num_threads: int = 2,
                  prefetch: int = 4, num_workers: int = 0,
                  decode: Callable[[dict], dict] = _image_and_label) -> grain.IterDataset:
  """An endless dataset of this process's train batches, reshuffled each epoch.

  `batch_size` is the per-process batch; `decode` turns a source example into arrays. Each epoch drops the last incomplete batch, so an epoch
  is exactly `len(source) // process_count // batch_size` batches.
  """
  # Equal shards, so every process runs the same number of steps per epoch.
  per_process = len(source) // process_count
  shard = grain.MapDataset.range(len(source))[process_index::process_count][:per_process]
  if len(shard) < batch_size:
    raise DataError(f'the train split has {len(shard)} examples per process, fewer than one batch '
                    f'of {batch_size}; lower --config.batch_size or widen --config.train_split')
  # Indices are shuffled and batched, then each batch is read at once.
  ds = (shard.shuffle(seed=seed).batch(batch_size, drop_remainder=True)
        .map(functools.partial(_read_batch, source, decode))
        .random_map(preprocess.train, seed=seed).repeat(None))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
  if num_workers > 0:
    # Grain's workers read absl flags, which a program without absl.app never parses.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def eval_batches(source: Any, preprocess: Preprocess, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1,
                 decode: Callable[[dict], dict] = _image_and_label) -> Iterator[dict]:
  """This process's share of `source` in batches of exactly `batch_size`, with a 'mask'.

  The last batch is padded by repeating its first example, with mask 0 on the padding. Every
  process yields the same number of batches (a fully masked one where its share is shorter), as
  a step over a multi-process array needs all processes.
  """
  shard = grain.MapDataset.range(len(source))[process_index::process_count]
  ds = (shard.batch(batch_size, drop_remainder=False)
        .map(functools.partial(_read_batch, source, decode)).map(preprocess.eval))
  largest_share = -(-len(source) // process_count)
  num_batches = -(-largest_share // batch_size)
  for batch in ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)):
    n = len(batch['label'])
    pad = batch_size - n
    batch = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in batch.items()}
    batch['mask'] = np.arange(batch_size) < n
    num_batches -= 1
    yield batch
  for _ in range(num_batches):
    yield {**batch, 'mask': np.zeros(batch_size, bool)}


def steps_per_epoch(num_examples: int, batch_size: int, process_count: int = 1) -> int:
  """Train steps per epoch of `train_dataset`, with `batch_size` the per-process batch."""
  return num_examples // process_count // batch_size
