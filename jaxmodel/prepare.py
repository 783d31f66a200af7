"""Turn an image folder (or a tar of one) into a TFDS dataset in array_record format.

Input layout (ImageNet style)::

    SRC/SPLIT/CLASS/image.jpg      e.g. SRC/train/cat/0001.jpg, SRC/test/cat/0001.png

SRC may also be a ``.tar``, ``.tar.gz`` or ``.tgz`` holding that layout, at its root or
below one top folder. The result is read back by name, with random access, and without
importing this module (TFDS reads a prepared dataset from its own files)::

    src = tfds.data_source(NAME, split='train[:90%]', data_dir=DATA_DIR)
    src[0]  # {'image': uint8 (H, W, 3), 'label': int}
    tfds.builder(NAME, data_dir=DATA_DIR).info.features['label'].names  # class names

Choices worth knowing:

- Example order. Within each split, examples are stored in a fixed permutation of the
  (class, file) pairs, drawn from ``seed`` after sorting files by name, and written with
  ``disable_shuffling=True`` so read order is write order. Hence slices are random,
  class-mixed subsets: ``train[90%:]`` is a fair validation split, not the last class.
  Same input + same seed gives the same files in the same order.
- Labels are indices into the sorted class-folder names, which must match across splits.
- Images are stored encoded. RGB JPEG/PNG files are stored byte-for-byte (no second JPEG
  generation loss); anything else (grayscale, RGBA, palette, other formats) is converted
  to RGB and stored as PNG. Decoding on read needs only PIL, not TensorFlow.
- All images must have the size of the first one in name order (split, class, file);
  others are treated as bad files (no resizing: stored pixels are the source pixels).
- Bad files (unreadable, not an image, wrong size) are skipped with a warning, or stop
  the run with ``on_bad_file='stop'``. Hidden files and nested folders are ignored.
- Nothing half-written ever reads as complete: the dataset is built in a temporary folder
  inside DATA_DIR and renamed into place at the end.
- A tar is unpacked under $TMPDIR (with max_per_class, only the files kept). Creating and
  deleting many small files can dominate the run time on slow disks: TMPDIR=/dev/shm helps.

CLI: ``python -m jaxmodel.prepare SRC --name NAME [--data_dir DIR] [--max_per_class N]
[--on_bad_file skip|stop] [--overwrite | --exist_ok] [--seed S]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import logging
import os
import posixpath
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

VERSION = '1.0.0'
_TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz')

log = logging.getLogger(__name__)


class PrepareError(ValueError):
  """Bad input or arguments; the message is one line saying what to do."""


def _visible(path: Path) -> list[Path]:
  """Sorted entries, without hidden files and macOS tar debris."""
  return sorted(p for p in path.iterdir()
                if not p.name.startswith('.') and p.name != '__MACOSX')


def _subdirs(path: Path) -> list[Path]:
  return [p for p in _visible(path) if p.is_dir()]


def _find_root(top: Path) -> Path:
  """The folder holding SPLIT/CLASS/files: `top` or a folder below single-child folders."""
  root = top
  while True:
    if any(f.is_file() for s in _subdirs(root) for c in _subdirs(s) for f in _visible(c)):
      return root
    children = _subdirs(root)
    if len(children) != 1:
      return top  # Let _list_files report what is missing, relative to what the user gave.
    root = children[0]


def _list_files(root: Path, shown, max_per_class: int | None):
  """Returns (class names, {split: [(path, label)]}) in sorted order."""
  example = 'SPLIT/CLASS/images, e.g. train/cat/0001.jpg'
  splits = _subdirs(root)
  if not splits:
    raise PrepareError(f'no split folders in {shown(root)}: expected {example}')
  classes, files = None, {}
  for split in splits:
    if not re.fullmatch(r'\w+', split.name):
      raise PrepareError(f'split folder {shown(split)} has a name TFDS cannot use: rename it '
                         'with letters, digits and _ only (e.g. train, test)')
    class_dirs = _subdirs(split)
    if not class_dirs:
      raise PrepareError(f'split folder {shown(split)} has no class folders: expected '
                         f'{example} (class folders must sit inside a split folder)')
    names = [c.name for c in class_dirs]
    if classes is None:
      classes = names
    elif names != classes:
      raise PrepareError(
          f'class folders differ between splits {splits[0].name!r} and {split.name!r} '
          f'(in only one of them: {sorted(set(names) ^ set(classes))}): make them identical')
    files[split.name] = [(f, label) for label, c in enumerate(class_dirs)
                         for f in [f for f in _visible(c) if f.is_file()][:max_per_class]]
  if not any(files.values()):
    raise PrepareError(f'the class folders in {shown(root)} hold no files: nothing to prepare')
  return classes, files


def _read_image(path: Path) -> tuple[bytes, tuple[int, int], bool]:
  """(bytes to store, (height, width), whether they differ from the file). Raises if bad."""
  data = path.read_bytes()
  with Image.open(io.BytesIO(data)) as im:
    im.load()  # Decode fully: a truncated file only fails here.
    if im.format in ('JPEG', 'PNG') and im.mode == 'RGB':
      return data, (im.height, im.width), False
    buf = io.BytesIO()
    im.convert('RGB').save(buf, format='PNG')
    return buf.getvalue(), (im.height, im.width), True


def _check_images(files, shown, on_bad_file: str):
  """Drops bad files (or raises). Returns ({split: [(path, label, convert)]}, shape, skipped)."""
  shape, kept, skipped = None, {}, []
  for split, items in files.items():
    kept[split] = []
    for path, label in items:
      try:
        _, size, convert = _read_image(path)
        if shape is None:
          shape = size
        if size != shape:
          raise ValueError(f'image is {size[0]}x{size[1]} (HxW), not {shape[0]}x{shape[1]} '
                           'like the first image; resize it or remove it')
      except Exception as e:  # PIL raises many types for bad data; all mean "bad file".
        reason = ' '.join(str(e).split()) or type(e).__name__  # One line.
        if isinstance(e, Image.UnidentifiedImageError):
          reason = 'not an image format PIL can read'
        if on_bad_file == 'stop':
          raise PrepareError(f'bad image file {shown(path)}: {reason} (pass --on_bad_file '
                             "skip, on_bad_file='skip', to skip bad files)") from e
        log.warning('skipping bad image file %s: %s', shown(path), reason)
        skipped.append(shown(path))
        continue
      kept[split].append((path, label, convert))
  if shape is None:
    raise PrepareError(f'no readable images among {len(skipped)} files: nothing to prepare')
  return kept, shape, skipped


def _builder_class(name: str, classes, shape, examples, description: str):
  """A GeneratorBasedBuilder named `name` that writes `examples` in the given order."""

  # skip_registration: the TFDS registry is global and refuses a name twice per process
  # (tests prepare several datasets); reading does not need the class anyway.
  class _FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description=description,
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(*shape, 3)),
              'label': tfds.features.ClassLabel(names=classes),
          }),
          supervised_keys=('image', 'label'),
          disable_shuffling=True,  # Keep our seeded order: read order == write order.
      )

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(items) for split, items in examples.items()}

    def _generate_examples(self, items):
      for i, (path, label, convert) in enumerate(items):
        # Files stored as-is were fully checked already: skip decoding them twice.
        image = _read_image(path)[0] if convert else path.read_bytes()
        yield i, {'image': image, 'label': label}

  _FolderBuilder.name = name
  return _FolderBuilder


def _extract(tar_path: Path, into: str, max_per_class: int | None) -> Path:
  try:
    with tarfile.open(tar_path) as tar:
      members = tar.getmembers()
      if max_per_class is not None:
        # Creating files is slow on some disks (50k CIFAR files: 25-55 s, deleting ~60 s), so unpack
        # only what _list_files keeps: the first max_per_class visible files per folder.
        per_dir = collections.defaultdict(list)
        for m in members:
          if not m.isdir() and not posixpath.basename(m.name).startswith('.'):
            per_dir[posixpath.dirname(m.name)].append(m)
        members = [m for m in members if m.isdir()] + [
            m for ms in per_dir.values() for m in sorted(ms, key=lambda m: m.name)[:max_per_class]]
        members.sort(key=lambda m: m.offset)  # Archive order: no seeking back in the gzip.
      tar.extractall(into, members=members, filter='data')  # 'data': no absolute paths etc.
  except (tarfile.TarError, OSError, EOFError) as e:
    raise PrepareError(f'cannot extract {tar_path}: {e}') from e
  return Path(into)


def prepare_image_folder(src: str, name: str, data_dir: str, *, seed: int = 0,
                         max_per_class: int | None = None, on_bad_file: str = 'skip',
                         overwrite: bool = False) -> dict:
  """Prepares `src` (folder or tar) as TFDS dataset `name` in `data_dir`; see module doc.

  `name` must be lower_snake_case and not a TFDS built-in name (reading by name would pick
  the built-in). `max_per_class` keeps the first N files by name per class and split.
  Raises PrepareError (one-line message) on bad input or an existing dataset.

  Returns {'name', 'data_dir', 'version', 'splits': {split: num_examples}, 'classes',
  'skipped': [paths of skipped bad files]}.
  """
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise PrepareError(f'dataset name {name!r} is not valid: use lower_snake_case, '
                       'e.g. cifar10_jpeg')
  if name in tfds.list_builders(with_community_datasets=False):
    # Reading by name would pick TFDS's own builder for it, which wants to download.
    raise PrepareError(f'dataset name {name!r} is a built-in TFDS dataset: pick another, '
                       f'e.g. {name}_folder')
  if on_bad_file not in ('skip', 'stop'):
    raise PrepareError(f"on_bad_file must be 'skip' or 'stop', not {on_bad_file!r}")
  if max_per_class is not None and max_per_class < 1:
    raise PrepareError(f'max_per_class must be at least 1, not {max_per_class}')
  src_path = Path(src).expanduser()
  if not src_path.exists():
    raise PrepareError(f'source {src} does not exist: pass an image folder or a .tar.gz of one')
  is_tar = src_path.is_file() and src_path.name.endswith(_TAR_SUFFIXES)
  if not (src_path.is_dir() or is_tar):
    raise PrepareError(f'source {src} is neither a folder nor a .tar/.tar.gz/.tgz file')
  data_path = Path(data_dir).expanduser().absolute()
  target = data_path / name / VERSION
  if target.exists() and not overwrite:
    raise PrepareError(f'dataset {name} {VERSION} already exists in {data_path}: pass '
                       '--overwrite (overwrite=True) to replace it')

  with tempfile.TemporaryDirectory(prefix='jaxmodel_prepare_') as unpacked:
    top = _extract(src_path, unpacked, max_per_class) if is_tar else src_path

    def shown(path: Path) -> str:  # The extracted copy is temporary: name tar members.
      return f'{src}:{path.relative_to(top)}' if is_tar else str(path)

    classes, files = _list_files(_find_root(top), shown, max_per_class)
    files, shape, skipped = _check_images(files, shown, on_bad_file)
    examples = {split: [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
                for split, items in files.items()}
    description = (f'Image folder {src} ({len(classes)} classes, seed={seed}, '
                   f'max_per_class={max_per_class}). Examples are stored in a seeded '
                   'random order, so split slices are class-mixed.')
    builder_cls = _builder_class(name, classes, shape, examples, description)

    # Build under a temporary data_dir beside the target, then rename: an interrupted run
    # leaves no NAME/VERSION folder, and with overwrite the old one survives a failed run.
    data_path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_path, prefix=f'.{name}-incomplete-') as tmp:
      builder = builder_cls(data_dir=tmp, file_format='array_record')
      # TFDS prints "prepared to <temporary path>" lines to stdout: misleading here, drop them.
      with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
      splits = {s: builder.info.splits[s].num_examples for s in examples}
      if target.exists():
        shutil.rmtree(target)
      target.parent.mkdir(exist_ok=True)
      os.replace(Path(tmp) / name / VERSION, target)

  return {'name': name, 'data_dir': str(data_path), 'version': VERSION, 'splits': splits,
          'classes': classes, 'skipped': skipped}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m jaxmodel.prepare',
      description='Prepare an image folder SRC/SPLIT/CLASS/*.jpg (or a .tar.gz of one) '
                  'as a TFDS array_record dataset.')
  parser.add_argument('src', help='image folder, or .tar/.tar.gz/.tgz of one')
  parser.add_argument('--name', required=True, help='dataset name, e.g. cifar10_jpeg')
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR',
                                                           '~/tensorflow_datasets'),
                      help='TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)')
  parser.add_argument('--max_per_class', type=int, default=None,
                      help='keep only the first N files (sorted) per class and split')
  parser.add_argument('--on_bad_file', choices=('skip', 'stop'), default='skip')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing dataset')
  parser.add_argument('--exist_ok', action='store_true',
                      help='do nothing (and succeed) if the dataset is already prepared')
  parser.add_argument('--seed', type=int, default=0, help='seed of the example order')
  args = parser.parse_args(argv)
  logging.basicConfig(format='%(levelname)s: %(message)s')  # Bad-file warnings, one line each.
  existing = Path(args.data_dir).expanduser().absolute() / args.name / VERSION
  if args.exist_ok and not args.overwrite and existing.exists():
    print(f'{args.name} {VERSION} is already prepared in {existing.parent.parent}; nothing to do')
    return 0
  try:
    summary = prepare_image_folder(
        args.src, args.name, args.data_dir, seed=args.seed, max_per_class=args.max_per_class,
        on_bad_file=args.on_bad_file, overwrite=args.overwrite)
  except PrepareError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2

  name, data_dir = summary['name'], summary['data_dir']
  print(f'prepared {name} {summary["version"]} in {data_dir}'
        f' ({len(summary["skipped"])} bad files skipped)')
  for split, n in summary['splits'].items():
    print(f'  {split}: {n} examples')
  print(f'classes ({len(summary["classes"])}): {" ".join(summary["classes"])}')
  split_args = list(summary['splits'])
  if list(summary['splits']) == ['train']:  # No held-out split given: suggest carving one.
    split_args = ['train[:90%]', 'train[90%:]']
  for split in split_args:
    print(f"read: tfds.data_source({name!r}, split={split!r}, data_dir={data_dir!r})")
  return 0


if __name__ == '__main__':
  sys.exit(main())
