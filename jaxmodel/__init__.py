"""jaxmodel: a JAX/Flax training library of pure, importable pieces.

  from jaxmodel import get_model, make_optimizer, create_train_state, train_step, eval_step

The names below are imported when first used, not with the package: `python -m jaxmodel.train`
restarts itself before it imports JAX (jaxmodel/memory.py), and only pays for JAX once.
"""

import importlib

_EXPORTS = {
    'MODELS': 'models', 'count_params': 'models', 'get_model': 'models',
    'make_lookahead': 'optim', 'make_optimizer': 'optim', 'make_schedule': 'optim',
    'TrainState': 'steps', 'create_train_state': 'steps', 'cross_entropy_loss': 'steps',
    'eval_step': 'steps', 'get_loss': 'steps', 'mse_loss': 'steps', 'train_step': 'steps',
}

__all__ = sorted(_EXPORTS)
__version__ = '0.1.0'


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)


def __dir__():
  return sorted([*globals(), *_EXPORTS])
