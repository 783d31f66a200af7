"""Export a trained model for serving: python -m jaxmodel.export --workdir W --out FILE
[--checkpoint latest|best|STEP] [--batch-size N] [--platforms cpu,cuda,tpu] [--overwrite]

FILE is a serialized `jax.export` artifact of the inference function, uint8 RGB images
(batch, H, W, C) -> logits (batch, classes), with the trained weights inside as constants and the
normalization inside the function. FILE.json beside it is the input spec: shape and dtype, the
normalization applied, the class names and where the weights came from. Loading needs only jax:

    exported = jax.export.deserialize(open(FILE, 'rb').read())
    logits = exported.call(images)  # images: uint8 (batch, H, W, C)

The batch dimension is symbolic (any batch size) unless --batch-size fixes it.
"""

import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmodel import ops
from jaxmodel import trained as trained_lib


def export(trained: trained_lib.Trained, batch_size: int | None = None,
           platforms: Sequence[str] | None = None) -> tuple[bytes, dict]:
  """(the serialized artifact, its input spec) of `trained`'s inference function."""
  h, w, c = trained.image_shape
  # The same float32 arithmetic as data.Preprocess.normalize, so logits match the library's.
  mean = 255 * np.asarray(trained.preprocess.mean, np.float32)
  scale = 1 / (255 * np.asarray(trained.preprocess.std, np.float32))
  model, variables = trained.model, trained.variables

  def logits(images):
    return model.apply(variables, (images.astype(jnp.float32) - mean) * scale, train=False)

  batch = jax.export.symbolic_shape('batch')[0] if batch_size is None else batch_size
  with ops.portable():  # XLA's own convolutions: the artifact must run without jaxmodel
    exported = jax.export.export(jax.jit(logits), platforms=platforms)(
        jax.ShapeDtypeStruct((batch, h, w, c), jnp.uint8))
  spec = {
      'format': 'jax.export',
      'input': {'shape': ['batch' if batch_size is None else batch_size, h, w, c],
                'dtype': 'uint8', 'meaning': 'RGB pixels 0-255, NHWC; normalized inside'},
      'output': {'shape': ['batch' if batch_size is None else batch_size,
                           len(trained.class_names)], 'dtype': 'float32',
                 'meaning': 'logits; softmax gives class probabilities'},
      'normalization': {'mean': list(trained.preprocess.mean), 'std': list(trained.preprocess.std),
                        'formula': '(pixels - 255 * mean) / (255 * std)'},
      'class_names': trained.class_names,
      'platforms': list(exported.platforms),
      'model': trained.config.model.to_dict(),
      'workdir': os.path.abspath(trained.workdir), 'checkpoint_step': trained.step,
      'jax_version': jax.__version__,
  }
  return bytes(exported.serialize()), spec


def main(argv: Sequence[str] | None = None) -> int:
  parser = trained_lib.ArgumentParser(prog='python -m jaxmodel.export', description=__doc__)
  parser.add_argument('--workdir', required=True, help='the training run to export')
  parser.add_argument('--out', required=True, help='the artifact file; its spec goes to OUT.json')
  parser.add_argument('--checkpoint', default='latest', help='latest, best or a step number')
  parser.add_argument('--batch-size', type=int, default=None,
                      help='a fixed batch size (default: symbolic, any batch size)')
  parser.add_argument('--platforms', default=None,
                      help='comma-separated, e.g. cpu,cuda (default: this machine\'s)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing OUT')
  return trained_lib.run_cli(_main, parser, argv)


def _main(args) -> int:
  spec_path = args.out + '.json'
  for path in (args.out, spec_path):
    if os.path.exists(path) and not args.overwrite:
      raise trained_lib.LoadError(f'{path} exists; pass --overwrite to replace it or another --out')
  if args.batch_size is not None and args.batch_size < 1:
    raise trained_lib.LoadError('--batch-size must be at least 1 (omit it for any batch size)')
  trained = trained_lib.load(args.workdir, args.checkpoint)
  platforms = args.platforms.split(',') if args.platforms else None
  artifact, spec = export(trained, args.batch_size, platforms)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  for path, content in ((args.out, artifact), (spec_path, json.dumps(spec, indent=2).encode())):
    with open(path + '.tmp', 'wb') as f:  # a killed export leaves no half-written OUT
      f.write(content)
    os.replace(path + '.tmp', path)
  print(f'exported {args.workdir} checkpoint step {trained.step} ({len(artifact) / 1e6:.2f} MB, '
        f'input uint8 {tuple(spec["input"]["shape"])}, {len(trained.class_names)} classes, '
        f'platforms {",".join(spec["platforms"])}) to {args.out}; spec in {spec_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
