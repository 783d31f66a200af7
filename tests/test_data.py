"""The Grain pipeline: deterministic, resumable, shape- and range-preserving, exact in eval."""

import chex
import grain
import numpy as np
import pytest

from jaxmodel import data


class ArraySource:
  """A random-access source like tfds.data_source: example i has every pixel equal to i."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'image': np.full((8, 8, 3), i % 256, np.uint8), 'label': i % 10}


PLAIN = data.Preprocess(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_shuffle_is_seeded_and_each_epoch_is_a_permutation():
  source = ArraySource(40)
  first = _take(iter(data.train_dataset(source, PLAIN, 8, seed=3)), 10)
  again = _take(iter(data.train_dataset(source, PLAIN, 8, seed=3)), 10)
  other = _take(iter(data.train_dataset(source, PLAIN, 8, seed=4)), 10)
  chex.assert_trees_all_equal(first, again)
  assert not all(np.array_equal(a['label'], b['label']) for a, b in zip(first, other))
  ids = [b['image'][:, 0, 0, 0].astype(int) for b in first]
  epoch1, epoch2 = np.concatenate(ids[:5]), np.concatenate(ids[5:])
  assert sorted(epoch1) == sorted(epoch2) == list(range(40))
  assert not np.array_equal(epoch1, epoch2)  # reshuffled
  chex.assert_trees_all_equal(np.concatenate([b['label'] for b in first[:5]]), epoch1 % 10)


def test_iterator_state_resumes_the_exact_next_batches():
  dataset = data.train_dataset(ArraySource(40), PLAIN, 8, seed=0)
  iterator = iter(dataset)
  _take(iterator, 7)
  saved = iterator.get_state()
  expected = _take(iterator, 4)
  resumed = iter(dataset)
  resumed.set_state(saved)
  chex.assert_trees_all_equal(_take(resumed, 4), expected)


def test_processes_read_disjoint_equal_shards():
  source = ArraySource(43)
  seen = []
  for index in range(2):
    batches = _take(iter(data.train_dataset(source, PLAIN, 7, seed=0, process_index=index,
                                            process_count=2)), 3)
    seen.append(set(np.concatenate([b['image'][:, 0, 0, 0] for b in batches]).astype(int)))
  assert len(seen[0]) == len(seen[1]) == 21
  assert not seen[0] & seen[1]
  assert data.steps_per_epoch(43, 7, process_count=2) == 3


def test_augmentation_keeps_shapes_range_and_crops_from_the_padded_image():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  preprocess = data.Preprocess(mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=4, flip=True)
  out = preprocess.augment(images, np.random.default_rng(1))
  chex.assert_shape(out, images.shape)
  assert out.dtype == np.uint8
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for image, result in zip(padded, out):
    windows = [image[y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
    assert any(np.array_equal(result, w) or np.array_equal(result, w[:, ::-1]) for w in windows)
  assert not np.array_equal(out, images)
  normalized = preprocess.normalize(out)
  assert normalized.dtype == np.float32
  np.testing.assert_allclose(normalized.min(), (0 - 0.5) / 0.25)
  np.testing.assert_allclose(normalized.max(), (1 - 0.5) / 0.25)


@pytest.mark.parametrize('pad_mode,crop_padding,flip', [
    ('constant', 4, True), ('reflect', 2, True), ('constant', 3, False), ('constant', 0, True)])
def test_augmentation_is_the_per_image_crop_and_flip_of_its_draws(pad_mode, crop_padding, flip):
  images = np.random.default_rng(0).integers(0, 256, (16, 12, 10, 3), dtype=np.uint8)
  before = images.copy()
  preprocess = data.Preprocess(mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=crop_padding,
                               pad_mode=pad_mode, flip=flip)
  out = preprocess.augment(images, np.random.default_rng(5))
  draws = np.random.default_rng(5)  # the same draws, in the same order, one image at a time
  p = crop_padding
  dy, dx = draws.integers(0, 2 * p + 1, size=(2, 16)) if p else (np.zeros(16, int),) * 2
  flips = draws.random(16) < 0.5 if flip else np.zeros(16, bool)
  for i, image in enumerate(images):
    padded = np.pad(image, ((p, p), (p, p), (0, 0)), mode=pad_mode)
    expected = padded[dy[i]:dy[i] + 12, dx[i]:dx[i] + 10]
    np.testing.assert_array_equal(out[i], expected[:, ::-1] if flips[i] else expected)
  np.testing.assert_array_equal(images, before)  # the input is left alone
  mean, std = np.float32(0.5 * 255), np.float32(0.25 * 255)
  np.testing.assert_allclose(preprocess.normalize(out), (out.astype(np.float32) - mean) / std,
                             rtol=1e-6, atol=1e-6)


class BatchedSource(ArraySource):
  """An ArraySource that also reads a list of examples at once, as TFDS sources do."""

  def __init__(self, n):
    super().__init__(n)
    self.batched_reads = 0

  def __getitems__(self, indices):
    self.batched_reads += 1
    return [self[i] for i in indices]


@pytest.mark.parametrize('source_type', [ArraySource, BatchedSource])
def test_batches_are_grains_per_example_pipeline_read_a_batch_at_a_time(source_type):
  source = source_type(45)
  preprocess = data.Preprocess(mean=(0.2,) * 3, std=(0.3,) * 3, crop_padding=2, flip=True)
  for process_index in (0, 1):
    batches = _take(iter(data.train_dataset(source, preprocess, 4, seed=7,
                                            process_index=process_index, process_count=2)), 12)
    # The plain composition: shard, shuffle, decode each example, batch, augment the batch.
    plain = (grain.MapDataset.source(source)[process_index::2][:22].shuffle(seed=7)
             .map(data._image_and_label).batch(4, drop_remainder=True)
             .random_map(preprocess.train, seed=7).repeat(None))
    chex.assert_trees_all_equal(batches, [plain[i] for i in range(12)])
  if source_type is BatchedSource:
    assert source.batched_reads >= 24


def test_no_augmentation_leaves_images_alone():
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  chex.assert_trees_all_equal(PLAIN.augment(images, np.random.default_rng(0)), images)


def test_eval_batches_count_every_example_once_with_a_padded_last_batch():
  batches = list(data.eval_batches(ArraySource(23), PLAIN, 10))
  assert len(batches) == 3
  for batch in batches:
    chex.assert_shape(batch['image'], (10, 8, 8, 3))
  masks = np.concatenate([b['mask'] for b in batches])
  ids = np.concatenate([b['image'][:, 0, 0, 0] for b in batches])[masks].astype(int)
  assert sorted(ids) == list(range(23))
  assert masks.sum() == 23


def test_eval_batches_give_every_process_as_many_batches():
  # 21 examples over 2 processes in batches of 5: shares of 11 and 10, but 3 batches each.
  shares = [list(data.eval_batches(ArraySource(21), PLAIN, 5, process_index=i, process_count=2))
            for i in range(2)]
  assert [len(batches) for batches in shares] == [3, 3]
  assert [sum(int(b['mask'].sum()) for b in batches) for batches in shares] == [11, 10]
  assert not shares[1][-1]['mask'].any()


def test_too_small_a_split_is_a_clear_error():
  with pytest.raises(data.DataError, match='fewer than one batch of 16'):
    data.train_dataset(ArraySource(10), PLAIN, 16, seed=0)


def test_real_prepared_split_reads_as_uint8_images(cifar_small):
  source, info = data.open_split(cifar_small['name'], 'train[:90%]', cifar_small['data_dir'])
  assert len(source) == 900
  assert info.features['label'].num_classes == 10
  batch = next(iter(data.train_dataset(source, data.Preprocess((0.5,) * 3, (0.5,) * 3), 32,
                                       seed=0)))
  chex.assert_shape(batch['image'], (32, 32, 32, 3))
  assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0


def test_a_split_in_memory_gives_the_same_batches_as_decoding_it(cifar_small):
  source, _ = data.open_split(cifar_small['name'], 'train[:90%]', cifar_small['data_dir'])
  in_memory = data.InMemory(source)
  assert len(in_memory) == len(source) == 900
  chex.assert_shape(in_memory.arrays['image'], (900, 32, 32, 3))
  assert in_memory.arrays['image'].dtype == np.uint8
  preprocess = data.Preprocess((0.5,) * 3, (0.5,) * 3, crop_padding=2, flip=True)
  decoded = _take(iter(data.train_dataset(source, preprocess, 64, seed=1)), 16)  # > an epoch
  chex.assert_trees_all_equal(
      _take(iter(data.train_dataset(in_memory, preprocess, 64, seed=1)), 16), decoded)
  chex.assert_trees_all_equal(list(data.eval_batches(in_memory, preprocess, 500)),
                              list(data.eval_batches(source, preprocess, 500)))


@pytest.mark.parametrize('name,split,message', [
    ('no_such_dataset', 'train', "dataset 'no_such_dataset' is not in"),
    ('cifar10_small', 'test', "split 'test' of 'cifar10_small' cannot be read"),
    ('cifar10_small', 'train[90%:90%]', 'selects no examples'),
])
def test_missing_datasets_and_splits_are_one_line_errors(cifar_small, name, split, message):
  with pytest.raises(data.DataError) as error:
    data.open_split(name, split, cifar_small['data_dir'])
  assert message in str(error.value)
  assert '\n' not in str(error.value)
  if name == 'no_such_dataset':
    assert 'python -m jaxmodel.prepare' in str(error.value)


def test_worker_processes_give_the_same_batches():
  source = ArraySource(40)
  threads = _take(iter(data.train_dataset(source, PLAIN, 8, seed=0)), 6)
  workers = _take(iter(data.train_dataset(source, PLAIN, 8, seed=0, num_workers=2)), 6)
  chex.assert_trees_all_equal(workers, threads)


def test_catalog_datasets_are_read_by_name(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path)):
    source, info = data.open_split('cifar10', 'train', str(tmp_path), download=True)
    example = source[0]
  assert len(source) == 20
  assert info.features['label'].num_classes == 10
  chex.assert_shape(example['image'], (32, 32, 3))


def test_a_catalog_dataset_missing_offline_says_how_to_get_it(tmp_path):
  with pytest.raises(data.DataError, match="'mnist' is not prepared in .*--config.download=True"):
    data.open_split('mnist', 'train', str(tmp_path), download=False)
