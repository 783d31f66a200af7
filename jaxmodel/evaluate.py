"""Measure a trained model: python -m jaxmodel.evaluate --workdir W [--dataset NAME --split S |
--image-folder PATH] [--checkpoint latest|best|STEP] [--tta[=flip_translate]]

Prints accuracy, loss, per-class accuracy and the confusion matrix, and writes them as JSON with
the confusion matrix as PNG into WORKDIR/evaluations/. Without --dataset or --image-folder it
evaluates the run's own validation split. An image folder holds CLASS/*.jpg|png with the model's
class names; images of another size are resized to the model's input.
"""

from jaxmodel import memory

if __name__ == '__main__':
  memory.use_huge_pages()  # may restart the process: first, before the imports below

import json
import os
import re
import sys
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodel import data, plots, trained as trained_lib


def folder_batches(files: Sequence[tuple[str, int]], trained: trained_lib.Trained,
                   batch_size: int, skipped: list[str]) -> Iterator[dict]:
  """Normalized batches of the (file, label) images, padded and masked like data.eval_batches;
  unreadable files are left out and their messages appended to `skipped`."""
  for start in range(0, len(files), batch_size):
    images, labels = [], []
    for path, label in files[start:start + batch_size]:
      try:
        images.append(trained_lib.read_image(path, trained.image_shape))
        labels.append(label)
      except trained_lib.LoadError as e:
        skipped.append(str(e))
    if not images:
      continue
    n, pad = len(images), batch_size - len(images)
    images = np.stack(images + [images[0]] * pad)
    yield {'image': trained.preprocess.normalize(images),
           'label': np.asarray(labels + [labels[0]] * pad, np.int32),
           'mask': np.arange(batch_size) < n}


def evaluate(trained: trained_lib.Trained, batches: Iterable[dict], tta: bool | str = False
             ) -> dict:
  """Accuracy, mean loss, per-class accuracy and confusion matrix over the masked batches."""
  logits_fn = trained.logits_fn(tta)
  loss_fn = trained.loss_fn()
  per_example_loss = jax.jit(lambda logits, labels: loss_fn(logits, labels))
  num_classes = len(trained.class_names)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  loss_sum = 0.0
  for batch in batches:
    logits = logits_fn(trained.variables, jnp.asarray(batch['image']))
    losses = np.asarray(per_example_loss(logits, batch['label']), np.float64)
    mask = np.asarray(batch['mask'], bool)
    predicted = np.asarray(jnp.argmax(logits, -1))[mask]
    np.add.at(confusion, (batch['label'][mask], predicted), 1)
    loss_sum += float(losses[mask].sum())
  count = int(confusion.sum())
  if count == 0:
    raise trained_lib.LoadError('no image could be evaluated')
  per_class = {}
  for i, name in enumerate(trained.class_names):
    total = int(confusion[i].sum())
    accuracy = float(confusion[i, i] / total) if total else None
    per_class[name] = {'accuracy': accuracy, 'count': total}
  return {'accuracy': float(np.trace(confusion)) / count, 'loss': loss_sum / count,
          'count': count, 'per_class': per_class, 'confusion_matrix': confusion.tolist()}


def format_report(results: dict, class_names: Sequence[str]) -> str:
  lines = [f'accuracy {results["accuracy"]:.4f} | loss {results["loss"]:.4f} | '
           f'{results["count"]} images', 'per-class accuracy:']
  width = max(len(n) for n in class_names)
  for name, entry in results['per_class'].items():
    accuracy = '   -  ' if entry['accuracy'] is None else f'{entry["accuracy"]:.4f}'
    lines.append(f'  {name:<{width}}  {accuracy}  ({entry["count"]} images)')
  lines.append('confusion matrix (rows: true class, columns: predicted, in the order above):')
  matrix = np.asarray(results['confusion_matrix'])
  cell = max(4, len(str(matrix.max())) + 1)
  for name, row in zip(class_names, matrix):
    lines.append(f'  {name:<{width}} ' + ''.join(f'{v:>{cell}}' for v in row))
  return '\n'.join(lines)


def _slug(text: str) -> str:
  """A file name part: 'ds-train[:80%]' -> 'ds-train_~80%'."""
  return re.sub(r'[^A-Za-z0-9_.%~-]+', '_', text.replace(':', '~')).strip('_')


def main(argv: Sequence[str] | None = None) -> int:
  parser = trained_lib.ArgumentParser(prog='python -m jaxmodel.evaluate', description=__doc__)
  parser.add_argument('--workdir', required=True, help='the training run to evaluate')
  parser.add_argument('--dataset', help='a TFDS dataset name (default: the run\'s)')
  parser.add_argument('--split', help='its split, slices allowed (default: the run\'s eval_split)')
  parser.add_argument('--data_dir', help='where --dataset is prepared (default: the run\'s)')
  parser.add_argument('--image-folder', help='a folder of CLASS/*.jpg|png to evaluate instead')
  parser.add_argument('--checkpoint', default='latest', help='latest, best or a step number')
  parser.add_argument('--tta', nargs='?', const='flip', default='none',
                      choices=('none', 'flip', 'flip_translate'),
                      help="test-time augmentation: 'flip' (the default of a bare --tta: mean "
                           "logits of each image and its mirror) or 'flip_translate' (airbench's "
                           "6 views)")
  parser.add_argument('--batch-size', type=int, default=None,
                      help='default: the run\'s eval_batch_size')
  return trained_lib.run_cli(_main, parser, argv)


def _main(args) -> int:
  if args.image_folder and (args.dataset or args.split):
    raise trained_lib.LoadError('pass either --image-folder or --dataset/--split, not both')
  trained = trained_lib.load(args.workdir, args.checkpoint)
  config = trained.config
  batch_size = args.batch_size or config.eval_batch_size
  skipped = []
  if args.image_folder:
    files = trained_lib.image_folder(args.image_folder, trained.class_names)
    batches = folder_batches(files, trained, batch_size, skipped)
    source_name = f'folder {args.image_folder}'
    slug = f'folder-{_slug(os.path.basename(os.path.abspath(args.image_folder)))}'
  else:
    dataset, split = args.dataset or config.dataset, args.split or config.eval_split
    source, info = data.open_split(dataset, split, args.data_dir or config.get('data_dir'))
    if info.features['label'].names != trained.class_names:
      raise trained_lib.LoadError(f'{dataset} has classes {info.features["label"].names}, the '
                                  f'model {trained.class_names}; evaluate on matching data')
    batches = data.eval_batches(source, trained.preprocess, batch_size)
    source_name = f'{dataset} {split}'
    slug = _slug(f'{dataset}-{split}')
  slug += f'-step{trained.step}' + {'none': '', 'flip': '-tta'}.get(args.tta, f'-tta-{args.tta}')

  results = evaluate(trained, batches, args.tta)
  for message in skipped:
    print(f'skipped {message}', file=sys.stderr)
  results = {'workdir': args.workdir, 'checkpoint_step': trained.step, 'source': source_name,
             'tta': args.tta, 'skipped_files': len(skipped), 'class_names': trained.class_names,
             **results}
  out_dir = os.path.join(args.workdir, 'evaluations')
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, f'{slug}.json')
  png_path = os.path.join(out_dir, f'{slug}-confusion.png')
  with open(json_path, 'w') as f:
    json.dump(results, f, indent=2)
  tta = f', {args.tta} TTA' if args.tta != 'none' else ''
  plots.confusion_matrix(np.asarray(results['confusion_matrix']), trained.class_names, png_path,
                         title=f'{source_name}, step {trained.step}{tta}')
  print(f'evaluated {args.workdir} checkpoint step {trained.step} on {source_name}{tta}')
  print(format_report(results, trained.class_names))
  print(f'wrote {json_path} and {png_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
