"""Configs: find one by name or path, apply `--config.KEY=VALUE` overrides, report errors in one line.

A config is a Python file whose `get_config()` returns an `ml_collections.ConfigDict`, usually
`base_config()` below with some values changed. Bundled configs live in `configs/` (installed as
`jaxmodel.configs`) and are found by name: `--config=cifar`.
"""

import ast
import difflib
import importlib.resources
import importlib.util
import json
import math
import os
import pathlib
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
  """A bad config name, key or value; its message is one line that says what to do."""


def base_config() -> ml_collections.ConfigDict:
  """Every key a run reads, with its default; bundled and user configs start from this."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: a TFDS dataset by name, read with tfds.data_source from data_dir (default
  # $TFDS_DATA_DIR or ~/tensorflow_datasets). Prepare an image folder offline with
  # `python -m jaxmodel.prepare`. Validation is carved from train by TFDS split slicing.
  config.dataset = 'cifar10_jpeg'
  config.data_dir = config_dict.placeholder(str)
  config.download = True  # TFDS catalog datasets (cifar10, mnist, ...) missing from data_dir
  config.train_split = 'train[:90%]'
  config.eval_split = 'train[90%:]'
  config.data = ml_collections.ConfigDict()
  config.data.crop_padding = 4  # random crop after zero padding by this many pixels; 0 turns it off
  config.data.pad_mode = 'constant'  # the crop's padding: 'constant' (zeros) or 'reflect'
  config.data.flip = True  # random horizontal flips
  config.data.alternating_flip = False  # airbench's: random at epoch 0, inverted every odd epoch
  config.data.mean = (0.4914, 0.4822, 0.4465)  # per channel, on pixels scaled to [0, 1]
  config.data.std = (0.2470, 0.2435, 0.2616)
  # Hold both splits on the device and make each batch inside the train step: no input pipeline,
  # no host round trip per step (for datasets that fit in memory; one process).
  config.data.on_device = False
  # With data.on_device: run this many train steps per call into the device (a compiled loop),
  # for small steps bound by per-call costs. The steps, their data and randomness are the same.
  config.steps_per_dispatch = 1
  # With the Grain pipeline: decode both image splits once into host memory (whole, in every
  # process) and slice batches out of them, instead of decoding every image every epoch.
  config.data.in_memory = False
  config.data.num_workers = 0  # Grain worker processes; 0 prepares batches in background threads
  config.data.prefetch = 4  # batches prepared ahead

  config.batch_size = 128  # global batch, split across processes
  config.eval_batch_size = 500
  # Validation logits averaged over test-time augmentations: 'none', 'flip' or 'flip_translate'
  # (airbench's 6 views: the images and two 1-pixel translations, each with its mirror image).
  config.eval_tta = 'none'
  # Report the training time to reach each of these validation accuracies (e.g. (0.9, 0.93)).
  config.accuracy_marks = ()
  config.num_epochs = 10

  # Model: a name from jaxmodel.models.MODELS; the other keys are its constructor arguments.
  config.model = ml_collections.ConfigDict({'name': 'resnet'})

  config.loss = 'cross_entropy'  # or 'mse'
  config.label_smoothing = 0.0

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'  # 'sgd', 'adam' or 'adamw'
  config.optimizer.learning_rate = 0.1  # the peak of the schedule
  config.optimizer.momentum = 0.9  # sgd; 0 for plain SGD
  config.optimizer.nesterov = False  # sgd
  config.optimizer.b1 = 0.9  # adam, adamw
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 5e-4  # L2 for sgd and adam, decoupled for adamw
  config.optimizer.grad_clip_norm = 0.0  # clip the global gradient norm; 0 turns it off
  config.optimizer.schedule = 'warmup_cosine'  # 'constant', 'warmup_cosine' or 'warmup_linear'
  config.optimizer.warmup_fraction = 0.05  # of all steps
  config.optimizer.init_scale = 0.0  # warm-up starts at this fraction of the peak
  config.optimizer.final_scale = 0.0  # decay ends at this fraction of the peak
  # ((regex on 'path/to/param', multiplier), ...): scales those params' learning rate; 0 freezes.
  config.optimizer.lr_multipliers = ()
  # ((regex, fraction), ...): those params stop training after that fraction of all steps.
  config.optimizer.freeze_after = ()
  # Lookahead averaging (airbench): every N steps average <- lerp(average, params, 1 - d),
  # params <- average, with d = decay^N x (step / total)^power. 0 turns it off.
  config.optimizer.lookahead_every = 0
  config.optimizer.lookahead_decay = 0.95
  config.optimizer.lookahead_power = 3.0

  # Scale-out (jaxmodel/parallel.py): the devices of every process form one mesh; the global
  # batch splits over data x fsdp, kernels' input features over fsdp and output features over tensor.
  config.parallel = ml_collections.ConfigDict()
  config.parallel.strategy = 'jit'  # 'jit' (sharded jax.jit) or 'shard_map' (pmap style, data only)
  config.parallel.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})  # -1: the rest
  # Threads XLA:CPU runs a step's operations on (its pool, as PJRT_NPROC sets it); 0: one per
  # core. Steps of a few microseconds per operation run faster on one: waking a second thread
  # for every operation costs more than sharing the work saves.
  config.parallel.cpu_threads = 0
  # Several processes (hosts): jax.distributed.initialize. 'auto' starts it when a coordinator is
  # given (here or $JAX_COORDINATOR_ADDRESS) or under SLURM with several tasks; 'always' (TPU pod
  # slices, other clusters JAX detects) or 'never'. Unset values come from the environment.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialize = 'auto'
  config.distributed.coordinator_address = config_dict.placeholder(str)  # host:port of process 0
  config.distributed.num_processes = config_dict.placeholder(int)
  config.distributed.process_id = config_dict.placeholder(int)

  # The model's forward and backward passes: 'float32', or 'bfloat16' on float32 master params
  # (GPU/TPU; on this CPU it measured no faster, experiments/README.md).
  config.compute_dtype = 'float32'
  config.compilation_cache = True  # executables kept in ~/.cache/jaxmodel (compile_cache.py)
  config.log_every_steps = 50
  # Log the gradients' global norm (train_grad_norm). Saved states are checked for non-finite
  # values either way; it costs a reduction over every gradient each step.
  config.log_grad_norm = True
  config.checkpoint_every_steps = 1000  # and at the end of training
  config.keep_checkpoints = 3
  # Also keep the best N checkpoints by the validation best_metric, saved at every evaluation
  # (epoch end); 0 turns it off. `python -m jaxmodel.evaluate --checkpoint best` loads the best.
  config.keep_best_checkpoints = 1
  config.best_metric = 'accuracy'  # validation 'accuracy' (higher is better) or 'loss' (lower)
  # Stop after this many evaluations in a row without best_metric improving by more than
  # early_stopping_min_delta; 0 turns early stopping off.
  config.early_stopping_patience = 0
  config.early_stopping_min_delta = 0.0
  # Fine-tuning: a workdir whose latest checkpoint gives the starting params and model state (same
  # model; a head for another class count starts fresh). '' starts from a random init.
  config.init_from = ''
  config.profile_steps = ''  # 'A:B': a jax.profiler trace of steps A+1..B in WORKDIR/profile
  return config


def _nearest(word: str, choices: Sequence[str]) -> str:
  close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.5)
  pool = close or sorted(choices)
  return ('did you mean ' if close else 'choose from ') + ', '.join(pool)


def configs_dir() -> pathlib.Path:
  """The bundled configs: installed as jaxmodel.configs, or configs/ beside a source checkout."""
  try:
    return pathlib.Path(str(importlib.resources.files('jaxmodel.configs')))
  except ModuleNotFoundError:  # running from a checkout whose jaxmodel/ shadows the install
    return pathlib.Path(__file__).resolve().parents[1] / 'configs'


def bundled_config_names() -> list[str]:
  return sorted(f.stem for f in configs_dir().glob('*.py') if not f.name.startswith('_'))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config named `spec` (bundled) or stored at path `spec` (a .py file)."""
  if spec.endswith('.py') or os.sep in spec:
    path = spec
    if not os.path.isfile(path):
      raise ConfigError(f'config file {spec!r} does not exist; pass a .py file with get_config() '
                        f'or a bundled name ({", ".join(bundled_config_names())})')
  else:
    names = bundled_config_names()
    if spec not in names:
      raise ConfigError(f'unknown config {spec!r}: {_nearest(spec, names)}')
    path = configs_dir() / f'{spec}.py'
  module_spec = importlib.util.spec_from_file_location(f'_jaxmodel_config_{spec}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config {spec!r} defines no get_config() function')
  config = module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'get_config() of {spec!r} must return an ml_collections.ConfigDict')
  return config


def _parse_value(text: str) -> Any:
  """A Python literal where `text` is one ('0.1', 'True', '(32, 64)'), else the string itself."""
  lowered = text.lower()
  if lowered in ('true', 'false'):
    return lowered == 'true'
  if lowered in ('none', 'null'):
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets dotted `key` to the value written as `text`, keeping the field's type."""
  parts = key.split('.')
  parent = config
  for depth, part in enumerate(parts):
    path = '.'.join(parts[:depth])
    if not isinstance(parent, ml_collections.ConfigDict):
      raise ConfigError(f'config key {path!r} is a value, not a group: cannot set {key!r}')
    if part not in parent:
      where = f' in {path!r}' if path else ''
      raise ConfigError(f'unknown config key {".".join(parts[:depth + 1])!r}{where}: '
                        f'{_nearest(part, list(parent.keys()))}')
    if depth < len(parts) - 1:
      parent = parent[part]
  leaf = parts[-1]
  old = parent[leaf]
  value = _parse_value(text)
  if isinstance(old, (tuple, list)) and not isinstance(value, (tuple, list)):
    value = (value,)  # '--config.model.widths=64' means a one-element tuple
  if isinstance(old, str) and not isinstance(value, str):
    value = text  # a string field keeps what was written, e.g. '--config.train_split=1e3'
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  try:
    parent[leaf] = type(old)(value) if isinstance(old, (tuple, list)) else value
  except TypeError:
    expected = type(old).__name__ if old is not None else parent.get_type(leaf).__name__
    raise ConfigError(f'config key {key!r} takes a {expected}, not {text!r} '
                      f'(now {old!r})') from None


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def fingerprint(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON data, for writing into a workdir and comparing on resume."""
  return json.loads(to_json(config))


def summary(config: ml_collections.ConfigDict, keys: Sequence[str]) -> str:
  """A one-line summary of the named (dotted) keys."""
  parts = []
  for key in keys:
    node = config
    for part in key.split('.'):
      node = node[part]
    parts.append(f'{key}={node}')
  return ' '.join(parts)


def profile_range(spec: str) -> tuple[int, int] | None:
  """(A, B) from profile_steps 'A:B' (0 <= A < B), else None."""
  start, _, stop = spec.partition(':')
  try:
    start, stop = int(start), int(stop)
  except ValueError:
    return None
  return (start, stop) if 0 <= start < stop else None


# Keys whose values must be of one kind; a config file can set anything, overrides keep types.
_INT_KEYS = ('seed', 'batch_size', 'eval_batch_size', 'num_epochs', 'log_every_steps',
             'checkpoint_every_steps', 'keep_checkpoints', 'keep_best_checkpoints',
             'early_stopping_patience', 'data.crop_padding', 'data.num_workers', 'data.prefetch')
_NUMBER_KEYS = ('label_smoothing', 'optimizer.learning_rate', 'optimizer.momentum', 'optimizer.b1',
                'optimizer.b2', 'optimizer.eps', 'optimizer.weight_decay',
                'optimizer.grad_clip_norm', 'optimizer.warmup_fraction', 'optimizer.init_scale',
                'optimizer.final_scale', 'early_stopping_min_delta')
_BOOL_KEYS = ('download', 'data.flip', 'optimizer.nesterov', 'compilation_cache')


def _lookup(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def _check_types(config: ml_collections.ConfigDict) -> None:
  kinds = ([(k, 'an int') for k in _INT_KEYS] + [(k, 'a finite number') for k in _NUMBER_KEYS]
           + [(k, 'True or False') for k in _BOOL_KEYS])
  for key, kind in kinds:
    try:
      value = _lookup(config, key)
    except (KeyError, AttributeError):
      continue  # a key this config does not have fails where it is read
    is_bool = isinstance(value, bool)
    ok = {'an int': isinstance(value, int) and not is_bool,
          'a finite number': (isinstance(value, (int, float)) and not is_bool
                              and math.isfinite(value)),
          'True or False': is_bool}[kind]
    if not ok:
      raise ConfigError(f'config key {key!r} must be {kind}, not {value!r} '
                        f'({type(value).__name__}); fix it with --config.{key}=VALUE')


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects values no run can use (wrong type, out of range, contradictory) before any work."""
  _check_types(config)
  opt = config.optimizer
  checks = [
      (config.batch_size > 0, 'batch_size must be positive'),
      (config.eval_batch_size > 0, 'eval_batch_size must be positive'),
      (config.num_epochs > 0, 'num_epochs must be positive'),
      (opt.learning_rate > 0, 'optimizer.learning_rate must be positive'),
      (opt.weight_decay >= 0, 'optimizer.weight_decay must be >= 0'),
      (0 <= config.label_smoothing < 1, 'label_smoothing must be in [0, 1)'),
      (0 <= opt.warmup_fraction < 1, 'optimizer.warmup_fraction must be in [0, 1)'),
      (0 <= opt.momentum < 1, 'optimizer.momentum must be in [0, 1)'),
      (0 <= opt.b1 < 1 and 0 <= opt.b2 < 1, 'optimizer.b1 and optimizer.b2 must be in [0, 1)'),
      (opt.eps > 0, 'optimizer.eps must be positive'),
      (opt.grad_clip_norm >= 0, 'optimizer.grad_clip_norm must be >= 0 (0 turns clipping off)'),
      (0 <= opt.init_scale <= 1 and 0 <= opt.final_scale <= 1,
       'optimizer.init_scale and optimizer.final_scale must be in [0, 1]'),
      (opt.name in ('sgd', 'adam', 'adamw'), f"optimizer.name {opt.name!r} is not 'sgd', 'adam' "
                                             f"or 'adamw'"),
      (opt.schedule in ('constant', 'warmup_cosine', 'warmup_linear'),
       f"optimizer.schedule {opt.schedule!r} is not 'constant', 'warmup_cosine' or "
       f"'warmup_linear'"),
      (config.compute_dtype in ('float32', 'bfloat16'),
       f"compute_dtype {config.compute_dtype!r} is not 'float32' or 'bfloat16'"),
      (config.loss in ('cross_entropy', 'mse'), f"loss {config.loss!r} is not 'cross_entropy' or "
                                                f"'mse'"),
      (not (config.loss == 'mse' and config.label_smoothing > 0),
       'label_smoothing applies to the cross_entropy loss only: set it to 0 or use cross_entropy'),
      (not (opt.nesterov and opt.name == 'sgd' and opt.momentum == 0),
       'optimizer.nesterov needs optimizer.momentum > 0'),
      (config.log_every_steps > 0, 'log_every_steps must be positive'),
      (config.checkpoint_every_steps > 0, 'checkpoint_every_steps must be positive'),
      (config.keep_checkpoints > 0, 'keep_checkpoints must be positive'),
      (config.data.crop_padding >= 0, 'data.crop_padding must be >= 0'),
      (config.data.pad_mode in ('constant', 'reflect'),
       "data.pad_mode must be 'constant' or 'reflect'"),
      (not config.data.alternating_flip or (config.data.flip and config.data.on_device),
       'data.alternating_flip needs data.flip=True and data.on_device=True'),
      (config.eval_tta in ('none', 'flip', 'flip_translate'),
       "eval_tta must be 'none', 'flip' or 'flip_translate'"),
      (all(0 < m <= 1 for m in config.accuracy_marks),
       'accuracy_marks must be accuracies in (0, 1]'),
      (config.steps_per_dispatch >= 1, 'steps_per_dispatch must be >= 1'),
      (config.parallel.cpu_threads >= 0, 'parallel.cpu_threads must be >= 0 (0: one per core)'),
      (config.steps_per_dispatch == 1 or config.data.on_device,
       'steps_per_dispatch > 1 needs data.on_device=True'),
      (config.keep_best_checkpoints >= 0, 'keep_best_checkpoints must be >= 0'),
      (config.best_metric in ('accuracy', 'loss'), "best_metric must be 'accuracy' or 'loss'"),
      (config.early_stopping_patience >= 0, 'early_stopping_patience must be >= 0'),
      (config.early_stopping_min_delta >= 0, 'early_stopping_min_delta must be >= 0'),
      (config.profile_steps == '' or profile_range(config.profile_steps) is not None,
       "profile_steps must be '' or 'A:B' with 0 <= A < B"),
      (config.data.num_workers >= 0 and config.data.prefetch >= 0,
       'data.num_workers and data.prefetch must be >= 0'),
      (len(config.data.mean) == len(config.data.std) and all(s > 0 for s in config.data.std),
       'data.mean and data.std need one value per channel, std > 0'),
  ]
  for ok, message in checks:
    if not ok:
      raise ConfigError(f'{message}; fix it with --config.KEY=VALUE')


USAGE = """usage: python -m jaxmodel.{program} --config=NAME|PATH.py [--config.KEY=VALUE ...] \
[--workdir=DIR] [--debug]
  --config       a bundled config ({names}) or a .py file defining get_config()
  --config.KEY   overrides one config value (nested keys with dots), keeping its type
  --workdir      where checkpoints, metrics and the resolved config go (default: runs/CONFIG-TIME)
  --debug        show tracebacks instead of one-line errors"""


def parse_command_line(argv: Sequence[str], program: str = 'train'):
  """(config, workdir or None, debug) from `--config=...`, `--config.KEY=VALUE`, `--workdir=...`."""
  spec, workdir, debug, overrides = None, None, False, []
  args = list(argv)
  while args:
    arg = args.pop(0)
    name, has_value, value = arg.partition('=')
    if name in ('--config', '--workdir') and not has_value:
      if not args:
        raise ConfigError(f'{name} needs a value, e.g. {name}=VALUE')
      value, has_value = args.pop(0), True
    if name in ('-h', '--help'):
      print(USAGE.format(program=program, names=', '.join(bundled_config_names())))
      raise SystemExit(0)
    elif name == '--config':
      spec = value
    elif name.startswith('--config.'):
      if not has_value:
        raise ConfigError(f'{arg!r} needs a value: {arg}=VALUE')
      overrides.append((name[len('--config.'):], value))
    elif name == '--workdir':
      workdir = value
    elif name == '--debug':
      debug = True
    else:
      flags = ['--config', '--config.KEY', '--workdir', '--debug', '--help']
      raise ConfigError(f'unknown argument {arg!r}: {_nearest(name, flags)}')
  if spec is None:
    raise ConfigError(f'pass --config=NAME (one of {", ".join(bundled_config_names())}) '
                      f'or --config=path/to/config.py')
  config = load_config(spec)
  for key, value in overrides:
    override(config, key, value)
  validate(config)
  return config, spec, workdir, debug
