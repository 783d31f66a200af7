"""Turn local text files into a TFDS text dataset in array_record format, offline.

    python -m jaxmodel.prepare_text FILE [FILE ...] --name NAME [--data_dir DIR]
        [--validation_fraction 0.1] [--chunk_size 10000] [--overwrite | --exist_ok]

The files (UTF-8) are joined in the order given; the last `validation_fraction` of the characters
is the 'validation' split, the rest 'train'. Examples are {'text': string}, the layout of TFDS's
`tiny_shakespeare`, so the same configs train on either; here each holds the next `chunk_size`
characters (tiny_shakespeare: the whole split), so split slices like train[:10%] select text. The vocabulary (every character,
sorted) is stored in the dataset's metadata. Read it back with::

    tfds.data_source(NAME, split='train', data_dir=DIR)[0]['text']            # bytes
    tfds.builder(NAME, data_dir=DIR).info.metadata['vocabulary']              # str

As with `jaxmodel.prepare`, the dataset is built in a temporary folder and renamed into place,
so an interrupted run leaves nothing that reads as complete.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import tensorflow_datasets as tfds

from jaxmodel.prepare import PrepareError

VERSION = '1.0.0'


def _builder_class(name: str, splits: dict[str, str], vocab: str, chunk_size: int,
                   description: str):
  class _TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=description,
          features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
          metadata=tfds.core.MetadataDict(vocabulary=vocab),
          disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(text) for split, text in splits.items()}

    def _generate_examples(self, text):
      for i, start in enumerate(range(0, len(text), chunk_size)):
        yield i, {'text': text[start:start + chunk_size]}

  _TextBuilder.name = name
  return _TextBuilder


def prepare_text(files: list[str], name: str, data_dir: str, *, validation_fraction: float = 0.1,
                 chunk_size: int = 10_000, overwrite: bool = False) -> dict:
  """Prepares `files` as TFDS text dataset `name` in `data_dir`; see the module doc.

  Returns {'name', 'data_dir', 'version', 'splits': {split: characters}, 'vocabulary'}.
  Raises PrepareError (one-line message) on bad input or an existing dataset.
  """
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise PrepareError(f'dataset name {name!r} is not valid: use lower_snake_case, e.g. my_text')
  if name in tfds.list_builders(with_community_datasets=False):
    raise PrepareError(f'dataset name {name!r} is a built-in TFDS dataset: pick another, '
                       f'e.g. {name}_local')
  if not 0 <= validation_fraction < 1:
    raise PrepareError(f'validation_fraction must be in [0, 1), not {validation_fraction}')
  if chunk_size < 1:
    raise PrepareError(f'chunk_size must be at least 1, not {chunk_size}')
  if not files:
    raise PrepareError('pass at least one text file')
  texts = []
  for file in files:
    path = Path(file).expanduser()
    if not path.is_file():
      raise PrepareError(f'{file} is not a file: pass UTF-8 text files')
    try:
      texts.append(path.read_text(encoding='utf-8'))
    except UnicodeDecodeError as e:
      raise PrepareError(f'{file} is not UTF-8 text ({e.reason} at byte {e.start}); convert it '
                         'or leave it out') from None
  text = ''.join(texts)
  cut = len(text) - int(len(text) * validation_fraction)
  splits = {'train': text[:cut]}
  if validation_fraction:
    splits['validation'] = text[cut:]
  if not all(splits.values()):
    raise PrepareError(f'the files hold {len(text)} characters: too few for a train and a '
                       'validation split; pass more text')
  data_path = Path(data_dir).expanduser().absolute()
  target = data_path / name / VERSION
  if target.exists() and not overwrite:
    raise PrepareError(f'dataset {name} {VERSION} already exists in {data_path}: pass '
                       '--overwrite (overwrite=True) to replace it')

  vocab = ''.join(sorted(set(text)))
  description = (f'Text of {len(files)} file(s) ({", ".join(os.path.basename(f) for f in files[:5])}'
                 f'{", ..." if len(files) > 5 else ""}), the last {validation_fraction:.0%} of the '
                 f'characters held out as validation.')
  builder_cls = _builder_class(name, splits, vocab, chunk_size, description)
  data_path.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=data_path, prefix=f'.{name}-incomplete-') as tmp:
    builder = builder_cls(data_dir=tmp, file_format='array_record')
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS names the temporary path: misleading
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    if target.exists():
      shutil.rmtree(target)
    target.parent.mkdir(exist_ok=True)
    os.replace(Path(tmp) / name / VERSION, target)
  return {'name': name, 'data_dir': str(data_path), 'version': VERSION,
          'splits': {s: len(t) for s, t in splits.items()}, 'vocabulary': vocab}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m jaxmodel.prepare_text',
      description='Prepare UTF-8 text files as a TFDS text dataset (train/validation).')
  parser.add_argument('files', nargs='+', help='text files, joined in this order')
  parser.add_argument('--name', required=True, help='dataset name, e.g. python_source')
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR',
                                                           '~/tensorflow_datasets'),
                      help='TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)')
  parser.add_argument('--validation_fraction', type=float, default=0.1,
                      help='the last fraction of the characters held out as validation')
  parser.add_argument('--chunk_size', type=int, default=10_000,
                      help='characters per example: the unit of split slices like train[:10%%]')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing dataset')
  parser.add_argument('--exist_ok', action='store_true',
                      help='do nothing (and succeed) if the dataset is already prepared')
  args = parser.parse_args(argv)
  tfds.disable_progress_bar()  # its bars name temporary paths
  existing = Path(args.data_dir).expanduser().absolute() / args.name / VERSION
  if args.exist_ok and not args.overwrite and existing.exists():
    print(f'{args.name} {VERSION} is already prepared in {existing.parent.parent}; nothing to do')
    return 0
  try:
    summary = prepare_text(args.files, args.name, args.data_dir,
                           validation_fraction=args.validation_fraction,
                           chunk_size=args.chunk_size, overwrite=args.overwrite)
  except PrepareError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'prepared {summary["name"]} {summary["version"]} in {summary["data_dir"]}: '
        + ', '.join(f'{s} {n:,} characters' for s, n in summary['splits'].items())
        + f'; vocabulary of {len(summary["vocabulary"])} characters')
  print(f'train on it: python -m jaxmodel.train --config=char_lm --config.dataset={summary["name"]}'
        f' --config.data_dir={summary["data_dir"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
