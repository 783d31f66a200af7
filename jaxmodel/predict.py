"""Classify images: python -m jaxmodel.predict --workdir W [--top-k K] [--checkpoint C] [--tta]
IMAGE [IMAGE ...]

Prints one line per image: `PATH: CLASS PROB, CLASS PROB, ...` (the top K). An unreadable or
non-image file gets a one-line message on stderr and the others still run; the exit code is then
1 (2 for bad arguments). Images of another size than the model's input are resized to it.
"""

import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodel import trained as trained_lib


def predict(trained: trained_lib.Trained, images: np.ndarray, top_k: int = 3,
            tta: bool = False) -> list[list[tuple[str, float]]]:
  """The top-k (class name, probability) of each uint8 image of `images` (B, H, W, C)."""
  logits = trained.logits_fn(tta)(trained.variables,
                                  jnp.asarray(trained.preprocess.normalize(images)))
  probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
  top = np.argsort(-probabilities, axis=-1)[:, :top_k]
  return [[(trained.class_names[c], float(p[c])) for c in row]
          for row, p in zip(top, probabilities)]


def main(argv: Sequence[str] | None = None) -> int:
  parser = trained_lib.ArgumentParser(prog='python -m jaxmodel.predict', description=__doc__)
  parser.add_argument('--workdir', required=True, help='the training run whose model to use')
  parser.add_argument('--checkpoint', default='latest', help='latest, best or a step number')
  parser.add_argument('--top-k', type=int, default=3, help='classes shown per image')
  parser.add_argument('--tta', action='store_true', help='average with the mirror image')
  parser.add_argument('images', nargs='+', metavar='IMAGE')
  return trained_lib.run_cli(_main, parser, argv)


def _main(args) -> int:
  if args.top_k < 1:
    raise trained_lib.LoadError('--top-k must be at least 1')
  trained = trained_lib.load(args.workdir, args.checkpoint)
  failed = 0
  readable = []
  for path in args.images:
    try:
      readable.append((path, trained_lib.read_image(path, trained.image_shape)))
    except trained_lib.LoadError as e:
      print(f'error: {e}', file=sys.stderr)
      failed += 1
  batch = 64  # bounded memory for long lists; one compiled shape for all full batches
  for start in range(0, len(readable), batch):
    chunk = readable[start:start + batch]
    predictions = predict(trained, np.stack([image for _, image in chunk]), args.top_k, args.tta)
    for (path, _), top in zip(chunk, predictions):
      print(f'{path}: ' + ', '.join(f'{name} {p:.3f}' for name, p in top), flush=True)
  if failed:
    print(f'{failed} of {len(args.images)} files could not be read as images', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
