"""jaxmodel: a JAX/Flax training library of pure, importable pieces.

  from jaxmodel import get_model, make_optimizer, create_train_state, train_step, eval_step
"""

from jaxmodel.models import MODELS, count_params, get_model
from jaxmodel.optim import make_optimizer, make_schedule
from jaxmodel.steps import (TrainState, create_train_state, cross_entropy_loss, eval_step,
                            get_loss, mse_loss, train_step)

__all__ = ['MODELS', 'TrainState', 'count_params', 'create_train_state', 'cross_entropy_loss',
           'eval_step', 'get_loss', 'get_model', 'make_optimizer', 'make_schedule', 'mse_loss',
           'train_step']
__version__ = '0.1.0'
