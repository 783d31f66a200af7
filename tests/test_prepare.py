"""Tests for jaxmodel.prepare: image folder / tar -> TFDS array_record dataset."""

import collections
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from jaxmodel import prepare
from jaxmodel.prepare import PrepareError, prepare_image_folder

from conftest import REPO, require_cifar_tar
CIFAR_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                 'ship', 'truck']


def _pixel(label: int, index: int) -> tuple[int, int, int]:
  """A colour that encodes (label, index), so each read example can be identified."""
  return (40 * label, 7 * index, 255 - 40 * label)


def _identify(example) -> tuple[int, int]:
  r, g, _ = (int(v) for v in example['image'][0, 0])
  return r // 40, g // 7


def _write(path: Path, label: int, index: int, mode: str = 'RGB', size=(8, 6)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new('RGB', size, _pixel(label, index)).convert(mode).save(path)


def _folder(root: Path, splits=(('train', 4), ('test', 2)), classes=('cat', 'dog', 'emu')):
  """root/SPLIT/CLASS/NN.png with identifiable pixels; returns root."""
  for split, n in splits:
    for label, cls in enumerate(classes):
      for i in range(n):
        _write(root / split / cls / f'{i:02d}.png', label, i)
  return root


def _read_all(name, split, data_dir):
  src = tfds.data_source(name, split=split, data_dir=str(data_dir))
  return [src[i] for i in range(len(src))]


def test_counts_labels_and_pixels_per_split(tmp_path):
  src = _folder(tmp_path / 'src')
  (src / 'train' / 'dog' / '.DS_Store').write_bytes(b'junk')  # Hidden: ignored, not "bad".
  summary = prepare_image_folder(str(src), 'tiny', str(tmp_path / 'data'))
  assert summary == {'name': 'tiny', 'data_dir': str(tmp_path / 'data'), 'version': '1.0.0',
                     'splits': {'test': 6, 'train': 12}, 'classes': ['cat', 'dog', 'emu'],
                     'skipped': []}
  for split, n in [('train', 4), ('test', 2)]:
    examples = _read_all('tiny', split, tmp_path / 'data')
    # Each (label, index) pair appears exactly once and its label matches its pixels.
    assert sorted(_identify(ex) for ex in examples) == [(l, i) for l in range(3) for i in range(n)]
    assert all(_identify(ex)[0] == ex['label'] for ex in examples)
    assert all(ex['image'].dtype == np.uint8 and ex['image'].shape == (6, 8, 3)
               for ex in examples)
  builder = tfds.builder('tiny', data_dir=str(tmp_path / 'data'))
  assert builder.info.features['label'].names == ['cat', 'dog', 'emu']


def test_reads_by_name_in_fresh_process_without_jaxmodel(tmp_path):
  prepare_image_folder(str(_folder(tmp_path / 'src')), 'fresh', str(tmp_path / 'data'))
  code = (
      'import sys, tensorflow_datasets as tfds\n'
      f'd = {str(tmp_path / "data")!r}\n'
      "src = tfds.data_source('fresh', split='train[:50%]', data_dir=d)\n"
      "print(len(src), src[0]['image'].shape, tfds.builder('fresh', data_dir=d)"
      ".info.features['label'].names, 'jaxmodel' in sys.modules, 'tensorflow' in sys.modules)\n")
  out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                       text=True, check=True).stdout
  assert out.strip() == "6 (6, 8, 3) ['cat', 'dog', 'emu'] False False"


def test_order_is_seeded_deterministic_and_class_mixed(tmp_path):
  src = _folder(tmp_path / 'src', splits=[('train', 10)], classes=('a', 'b', 'c', 'd'))
  order = {}
  for run, seed in [('first', 0), ('again', 0), ('other', 1)]:
    prepare_image_folder(str(src), 'mixed', str(tmp_path / run), seed=seed)
    order[run] = [_identify(ex) for ex in _read_all('mixed', 'train', tmp_path / run)]
  assert order['first'] == order['again']
  # Stored order is the documented one: a seeded permutation of the name-sorted files.
  in_name_order = [(label, i) for label in range(4) for i in range(10)]
  assert order['first'] == [in_name_order[i] for i in np.random.default_rng(0).permutation(40)]
  assert order['first'] != order['other']
  labels = [label for label, _ in order['first']]
  assert labels != sorted(labels)
  # The validation slice users carve off the end is a mix of classes, not the last class.
  val = _read_all('mixed', 'train[80%:]', tmp_path / 'first')
  assert len(val) == 8 and len({ex['label'] for ex in val}) >= 3


def test_grayscale_rgba_and_jpeg_become_rgb(tmp_path):
  src = tmp_path / 'src'
  _write(src / 'train' / 'a' / '0.png', 0, 0, mode='L')
  _write(src / 'train' / 'a' / '1.png', 0, 1, mode='RGBA')
  _write(src / 'train' / 'b' / '0.jpg', 1, 0)
  prepare_image_folder(str(src), 'modes', str(tmp_path / 'data'))
  examples = _read_all('modes', 'train', tmp_path / 'data')
  assert [ex['image'].shape for ex in examples] == [(6, 8, 3)] * 3
  pixels = sorted((ex['label'], tuple(int(v) for v in ex['image'][0, 0])) for ex in examples)
  grey = Image.new('RGB', (1, 1), _pixel(0, 0)).convert('L').getpixel((0, 0))
  assert pixels[:2] == sorted([(0, (grey,) * 3), (0, _pixel(0, 1))])
  # JPEG bytes are stored as-is (lossy), so compare loosely.
  np.testing.assert_allclose(pixels[2][1], _pixel(1, 0), atol=4)


def _with_bad_files(src: Path) -> dict[str, str]:
  bad = {'train/cat/01.png': 'garbage', 'train/dog/99.jpg': 'truncated',
         'test/emu/00.png': 'size', 'train/emu/notes.txt': 'text'}
  (src / 'train/cat/01.png').write_bytes(b'not an image at all')
  good = (src / 'train/dog/00.png').read_bytes()
  (src / 'train/dog/99.jpg').write_bytes(good[: len(good) // 2])
  _write(src / 'test/emu/00.png', 2, 0, size=(9, 9))
  (src / 'train/emu/notes.txt').write_text('hello')
  return bad


def test_bad_files_are_skipped_counted_and_logged(tmp_path, caplog):
  src = _folder(tmp_path / 'src')
  bad = _with_bad_files(src)
  with caplog.at_level(logging.WARNING, logger='jaxmodel.prepare'):
    summary = prepare_image_folder(str(src), 'skips', str(tmp_path / 'data'))
  assert sorted(summary['skipped']) == sorted(str(src / b) for b in bad)
  # train: 12 + 2 extra files - 3 bad; test: 6 - 1 wrong size.
  assert summary['splits'] == {'train': 11, 'test': 5}
  warnings = [r.getMessage() for r in caplog.records if r.name == 'jaxmodel.prepare']
  assert len(warnings) == 4 and all('\n' not in w for w in warnings)
  assert all(any(b in w for w in warnings) for b in bad)
  assert len(_read_all('skips', 'train', tmp_path / 'data')) == 11


def test_bad_file_stops_with_one_line_error_and_writes_nothing(tmp_path):
  src = _folder(tmp_path / 'src')
  _with_bad_files(src)
  with pytest.raises(PrepareError, match='test/emu/00.png') as err:
    prepare_image_folder(str(src), 'stops', str(tmp_path / 'data'), on_bad_file='stop')
  assert '\n' not in str(err.value) and '9x9' in str(err.value)
  assert not (tmp_path / 'data' / 'stops').exists()


@pytest.mark.parametrize('layout, message', [
    ({}, 'no split folders'),
    ({'x.png': 'file'}, 'no split folders'),
    ({'train/x.png': 'file'}, 'has no class folders'),
    ({'train/': 'dir'}, 'has no class folders'),
    ({'train/a/0.png': 'img', 'test/b/0.png': 'img'}, 'class folders differ'),
    ({'train/a/': 'dir', 'test/a/': 'dir'}, 'hold no files'),
    ({'train/a/0.png': 'junk'}, 'no readable images'),
])
def test_bad_layouts_raise_one_line_errors(tmp_path, layout, message):
  src = tmp_path / 'src'
  src.mkdir()
  for rel, kind in layout.items():
    path = src / rel
    if kind == 'dir':
      path.mkdir(parents=True)
    elif kind == 'img':
      _write(path, 0, 0)
    else:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(b'junk')
  with pytest.raises(PrepareError, match=message) as err:
    prepare_image_folder(str(src), 'layout', str(tmp_path / 'data'))
  assert '\n' not in str(err.value)


def test_refuses_to_overwrite_unless_asked(tmp_path):
  src, data = _folder(tmp_path / 'src'), tmp_path / 'data'
  prepare_image_folder(str(src), 'again', str(data), max_per_class=1)
  with pytest.raises(PrepareError, match='--overwrite'):
    prepare_image_folder(str(src), 'again', str(data))
  assert len(_read_all('again', 'train', data)) == 3  # Untouched.
  summary = prepare_image_folder(str(src), 'again', str(data), overwrite=True)
  assert summary['splits'] == {'test': 6, 'train': 12}
  assert len(_read_all('again', 'train', data)) == 12
  assert sorted(os.listdir(data)) == ['again']  # No temporary folders left behind.


def test_failure_while_writing_leaves_old_dataset_and_no_partial_one(tmp_path, monkeypatch):
  src, data = _folder(tmp_path / 'src'), tmp_path / 'data'
  prepare_image_folder(str(src), 'atomic', str(data), max_per_class=1)
  real_read, calls = prepare._read_image, collections.Counter()

  def failing_read(path):
    calls['n'] += 1
    if calls['n'] > 18 + 5:  # Past the 18-file check, in the middle of writing.
      raise OSError('disk went away')
    data, size, _ = real_read(path)
    return data, size, True  # "Needs conversion": the writer reads through us too.

  monkeypatch.setattr(prepare, '_read_image', failing_read)
  with pytest.raises(OSError, match='disk went away'):
    prepare_image_folder(str(src), 'atomic', str(data), overwrite=True)
  assert sorted(os.listdir(data)) == ['atomic']
  assert sorted(os.listdir(data / 'atomic')) == ['1.0.0']
  assert len(_read_all('atomic', 'train', data)) == 3  # The old dataset, intact.


@pytest.mark.parametrize('top', ['', 'cifar-mini/'])
def test_tar_gz_with_or_without_top_folder(tmp_path, top):
  src = _folder(tmp_path / 'src')
  archive = tmp_path / 'images.tgz'
  with tarfile.open(archive, 'w:gz') as tar:
    for split in ('train', 'test'):
      tar.add(src / split, arcname=top + split)
  summary = prepare_image_folder(str(archive), 'from_tar', str(tmp_path / 'data'),
                                 max_per_class=3)
  assert summary['splits'] == {'test': 6, 'train': 9}
  examples = _read_all('from_tar', 'train', tmp_path / 'data')
  # max_per_class keeps the first files by name: indices 0..2 of every class.
  assert sorted(_identify(ex) for ex in examples) == [(l, i) for l in range(3) for i in range(3)]


def test_real_cifar_tar_small(tmp_path):
  summary = prepare_image_folder(str(require_cifar_tar()), 'cifar10_jpeg', str(tmp_path),
                                 max_per_class=20)
  assert summary['splits'] == {'train': 200} and summary['classes'] == CIFAR_CLASSES
  assert summary['skipped'] == []
  train = _read_all('cifar10_jpeg', 'train[:90%]', tmp_path)
  val = _read_all('cifar10_jpeg', 'train[90%:]', tmp_path)
  assert len(train) == 180 and len(val) == 20
  assert collections.Counter(ex['label'] for ex in train + val) == {i: 20 for i in range(10)}
  assert len({ex['label'] for ex in val}) >= 5
  assert all(ex['image'].shape == (32, 32, 3) and ex['image'].dtype == np.uint8
             for ex in train + val)


def test_cli_missing_path_exits_2_with_one_line_error(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'jaxmodel.prepare', str(tmp_path / 'nope'), '--name', 'x',
       '--data_dir', str(tmp_path / 'data')],
      cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1
  assert 'nope' in result.stderr and 'Traceback' not in result.stderr


def test_cli_prints_counts_classes_and_split_strings(tmp_path, capsys):
  src = _folder(tmp_path / 'src', splits=[('train', 2)])
  assert prepare.main([str(src), '--name', 'cli', '--data_dir', str(tmp_path / 'd')]) == 0
  out = capsys.readouterr().out
  assert '  train: 6 examples' in out and 'classes (3): cat dog emu' in out
  assert f"tfds.data_source('cli', split='train[90%:]', data_dir='{tmp_path / 'd'}')" in out


def test_cli_exist_ok_leaves_a_prepared_dataset_alone(tmp_path, capsys):
  src = tmp_path / 'src' / 'train'
  for label in ('a', 'b'):
    (src / label).mkdir(parents=True)
    Image.new('RGB', (4, 4), (10, 20, 30)).save(src / label / '0.png')
  args = [str(tmp_path / 'src'), '--name', 'again', '--data_dir', str(tmp_path / 'data')]
  assert prepare.main(args) == 0
  dataset_file = next((tmp_path / 'data' / 'again').rglob('*.array_record*'))
  before = dataset_file.stat().st_mtime_ns
  capsys.readouterr()
  assert prepare.main(args + ['--exist_ok']) == 0
  assert 'already prepared' in capsys.readouterr().out
  assert dataset_file.stat().st_mtime_ns == before
  assert prepare.main(args) == 2  # without it, an existing dataset is not replaced silently
