"""Checkpoints: one Orbax manager saves the train state and the data iterator's state together.

A checkpoint is the state's arrays (step, params, model state, optimizer state, RNG key) and the
Grain iterator's position, so a resumed run continues with the exact next batch. Saves are
asynchronous; Orbax writes into a temporary folder and renames it when complete, so a killed
save is never listed as a checkpoint.
"""

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxmodel.steps import TrainState


def _arrays(state: TrainState) -> dict:
  return {'step': state.step, 'params': state.params, 'model_state': state.model_state,
          'opt_state': state.opt_state, 'rng': state.rng}


def make_manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler()})


def save(manager: ocp.CheckpointManager, state: TrainState, data_iterator: Any = None) -> None:
  """Starts an asynchronous save of `state` (and the iterator) at `state.step`."""
  items = {'state': ocp.args.StandardSave(_arrays(state))}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(int(state.step), args=ocp.args.Composite(**items))


def restore(manager: ocp.CheckpointManager, state: TrainState, data_iterator: Any = None,
            step: int | None = None) -> TrainState:
  """`state` with the arrays of checkpoint `step` (default: the latest); sets the iterator too.

  `state` serves as the template: restored arrays take its shapes, dtypes and shardings.
  """
  step = manager.latest_step() if step is None else step
  template = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(state))
  items = {'state': ocp.args.StandardRestore(template)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  arrays = manager.restore(step, args=ocp.args.Composite(**items))['state']
  return state.replace(**arrays)
