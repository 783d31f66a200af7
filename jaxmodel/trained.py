"""A trained model rebuilt from its workdir (config.json + checkpoints), for inference and tuning.

`load(workdir)` gives the model, its variables (params and model state), the class names (from the
training dataset's TFDS info), the input shape and the normalization, so evaluate, predict and
export all see exactly what training saw. `transfer(...)` starts a new run from another run's
weights, re-initializing what does not fit (a classifier head for another number of classes).
"""

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from jaxmodel import checkpoint, data, models, optim
from jaxmodel.steps import create_train_state, get_loss, tta_logits

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')


class LoadError(ValueError):
  """A workdir, checkpoint or image that cannot be used; its one-line message says what to do."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are LoadErrors, reported in one line by `run_cli`."""

  def error(self, message):
    raise LoadError(f'{message}; see --help')


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None) -> int:
  """Runs `main(args)`; a bad input ends in one line on stderr and exit code 2 (a traceback with
  --debug)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  parser.add_argument('--debug', action='store_true', help='tracebacks instead of one-line errors')
  try:
    return main(parser.parse_args(argv))
  except (LoadError, data.DataError, ValueError) as e:
    if '--debug' in argv:
      raise
    print(f'error: {str(e).splitlines()[0] if str(e) else type(e).__name__}', file=sys.stderr)
    return 2


@dataclasses.dataclass
class Trained:
  config: ml_collections.ConfigDict
  model: Any
  variables: dict  # {'params': ..., **model_state}
  class_names: list[str]
  image_shape: tuple[int, int, int]  # (H, W, C)
  preprocess: data.Preprocess  # eval normalization, from the config
  step: int
  workdir: str

  def logits_fn(self, tta: bool | str = False):
    """A jitted (variables, normalized images (B, H, W, C)) -> logits; `tta` True is 'flip' (the
    mean over the images and their mirror images), or a mode of steps.tta_logits."""
    tta = {True: 'flip', False: 'none'}.get(tta, tta)
    return jax.jit(functools.partial(tta_logits, self.model.apply, tta=tta))

  def loss_fn(self):
    return get_loss(self.config.loss, self.config.label_smoothing)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise LoadError(f'{workdir} has no config.json; pass the --workdir of a training run')
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def _tuples(tree: Any) -> Any:
  """JSON lists back to the tuples configs use (model widths, normalization)."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree


def dataset_info(config: ml_collections.ConfigDict) -> Any:
  import tensorflow_datasets as tfds  # slow to import; only loading needs it
  data_dir = data.default_data_dir(config.get('data_dir'))
  try:
    builder = tfds.builder(config.dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    builder = None
  if builder is None or not builder.is_prepared():
    raise LoadError(f'the training dataset {config.dataset!r} (for the class names and image '
                    f'shape) is not in {data_dir}; prepare it there or set TFDS_DATA_DIR')
  return builder.info


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  kwargs = {k: v for k, v in config.model.items() if k != 'name'}
  return models.get_model(config.model.name, num_classes=num_classes, **kwargs)


def checkpoint_step(manager: ocp.CheckpointManager, which: str | int, workdir: str) -> int:
  """The step of checkpoint `which`: 'latest', 'best' (by the validation metric) or a step."""
  steps = manager.all_steps()
  if not steps:
    raise LoadError(f'{workdir} has no checkpoint; train it first (or finish a save)')
  if which == 'latest':
    return manager.latest_step()
  if which == 'best':
    step = checkpoint.best_step(manager)
    if step is None:
      raise LoadError(f'no checkpoint in {workdir} carries a validation metric (the run kept no '
                      f'best checkpoints); use --checkpoint latest')
    return step
  try:
    step = int(which)
  except ValueError:
    raise LoadError(f'--checkpoint {which!r}: use latest, best or a step number') from None
  if step not in steps:
    raise LoadError(f'{workdir} has no checkpoint at step {step}; it has {sorted(steps)}')
  return step


def restore_variables(workdir: str, config: ml_collections.ConfigDict, model, image_shape,
                      which: str | int = 'latest') -> tuple[dict, int]:
  """({'params': ..., **model_state}, step) of checkpoint `which` of the run in `workdir`."""
  template_state = jax.eval_shape(
      lambda: create_train_state(model, optim.make_optimizer(config.optimizer, 1),
                                 jnp.zeros((1, *image_shape)), jax.random.PRNGKey(0),
                                 lookahead=optim.make_lookahead(config.optimizer, 1)))
  manager = checkpoint.make_manager(workdir, config.keep_checkpoints,
                                    **checkpoint.best_options(config))
  try:
    step = checkpoint_step(manager, which, workdir)
    state = checkpoint.restore(manager, template_state, step=step)
  finally:
    manager.close()
  return {'params': state.params, **state.model_state}, step


def load(workdir: str, which: str | int = 'latest') -> Trained:
  """The model trained in `workdir`, with the weights of checkpoint `which`."""
  config = read_config(workdir)
  info = dataset_info(config)
  class_names = list(info.features['label'].names)
  image_shape = tuple(info.features['image'].shape)
  model = build_model(config, len(class_names))
  variables, step = restore_variables(workdir, config, model, image_shape, which)
  return Trained(config=config, model=model, variables=variables, class_names=class_names,
                 image_shape=image_shape, preprocess=data.preprocess_from_config(config, False),
                 step=step, workdir=workdir)


def transfer(new: Any, old: Any, prefix: str = '') -> tuple[Any, list[str]]:
  """`new` with every leaf of `old` found at the same path with the same shape; and the paths of
  the leaves of `new` kept as initialized (e.g. a head for another number of classes)."""
  if not isinstance(new, dict):
    if old is not None and np.shape(old) == np.shape(new):
      return jnp.asarray(old, dtype=new.dtype), []
    return new, [prefix.rstrip('/')]
  out, fresh = {}, []
  for key, value in new.items():
    sub_old = old.get(key) if isinstance(old, dict) else None
    out[key], sub_fresh = transfer(value, sub_old, f'{prefix}{key}/')
    fresh += sub_fresh
  return out, fresh


def init_from(source_workdir: str, config: ml_collections.ConfigDict, params: Any,
              model_state: Any) -> tuple[Any, Any, list[str]]:
  """(params, model_state, re-initialized param paths) for a run starting from `source_workdir`'s
  latest checkpoint. The model must be the same architecture; the class count may differ."""
  source_config = read_config(source_workdir)
  if source_config.model.to_dict() != _tuples(config.model.to_dict()):
    raise LoadError(f'init_from {source_workdir} trained model {source_config.model.to_dict()}, '
                    f'this config builds {config.model.to_dict()}; use the same model settings')
  info = dataset_info(source_config)
  model = build_model(source_config, info.features['label'].num_classes)
  variables, _ = restore_variables(source_workdir, source_config, model,
                                   tuple(info.features['image'].shape))
  old_params = variables.pop('params')
  params, fresh = transfer(params, old_params)
  model_state, _ = transfer(model_state, variables)
  return params, model_state, fresh


def read_image(path: str, shape: Sequence[int]) -> np.ndarray:
  """The image at `path` as uint8 (H, W, C) of `shape`, resized if its size differs."""
  h, w, c = shape
  try:
    with Image.open(path) as image:
      image = image.convert('RGB' if c == 3 else 'L')
      if image.size != (w, h):
        image = image.resize((w, h), Image.BILINEAR)
      pixels = np.asarray(image, np.uint8)
  except FileNotFoundError:
    raise LoadError(f'{path}: no such file') from None
  except IsADirectoryError:
    raise LoadError(f'{path}: is a folder, not an image') from None
  except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL's "cannot identify"
    raise LoadError(f'{path}: not a readable image ({str(e).splitlines()[0][:120]})') from None
  return pixels.reshape(h, w, c)


def image_folder(path: str, class_names: Sequence[str]) -> list[tuple[str, int]]:
  """(file, label) for every image of a PATH/CLASS/*.jpg|png folder, labels by `class_names`."""
  if not os.path.isdir(path):
    raise LoadError(f'--image-folder {path} is not a folder; pass PATH holding CLASS/*.jpg')
  classes = sorted(d for d in os.listdir(path)
                   if os.path.isdir(os.path.join(path, d)) and not d.startswith('.'))
  unknown = [c for c in classes if c not in class_names]
  if not classes or unknown:
    what = f'has class folders the model does not know ({", ".join(unknown)})' if unknown else \
        'has no class folders'
    raise LoadError(f'{path} {what}; name its subfolders after the model\'s classes: '
                    f'{", ".join(class_names)}')
  files = []
  for name in classes:
    folder = os.path.join(path, name)
    files += [(os.path.join(folder, f), class_names.index(name)) for f in sorted(os.listdir(folder))
              if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith('.')]
  if not files:
    raise LoadError(f'{path} holds no .jpg or .png images in its class folders')
  return files
