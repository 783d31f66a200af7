"""Checkpoints: one Orbax manager saves the train state and the data iterator's state together.

A checkpoint is the state's arrays (step, params, model state, optimizer state, RNG key) and the
Grain iterator's position, so a resumed run continues with the exact next batch. Saves are
asynchronous; Orbax writes into a temporary folder and renames it when complete, so a killed
save is never listed as a checkpoint.
"""

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxmodel.steps import TrainState

# Checkpoints saved between evaluations have no metric by design; Orbax warns on each one.
logging.getLogger('absl').addFilter(
    lambda record: 'did not provide metrics' not in record.getMessage())


def _arrays(state: TrainState) -> dict:
  return {'step': state.step, 'params': state.params, 'model_state': state.model_state,
          'opt_state': state.opt_state, 'rng': state.rng}


def make_manager(workdir: str, keep: int = 3, keep_best: int = 0,
                 best_metric: str = 'accuracy') -> ocp.CheckpointManager:
  """Keeps the newest `keep` checkpoints and, with `keep_best`, also the best `keep_best` by the
  validation `best_metric` ('accuracy' or 'loss') saved with them."""
  preserve = ocp.checkpoint_managers.LatestN(keep)  # the newest always stays: resume needs it
  if keep_best:
    # Checkpoints saved between evaluations carry no metric: only LatestN keeps those.
    best = ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[best_metric], n=keep_best,
                                         reverse=best_metric == 'loss',
                                         keep_checkpoints_without_metrics=False)
    preserve = ocp.checkpoint_managers.AnyPreservationPolicy([preserve, best])
  # best_fn makes Orbax write the metrics next to the checkpoint and rank them in best_step().
  options = ocp.CheckpointManagerOptions(
      create=True, preservation_policy=preserve,
      best_fn=(lambda m: m[best_metric]) if keep_best else None,
      best_mode='min' if best_metric == 'loss' else 'max')
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler()})


def best_options(config: Any) -> dict:
  return {'keep_best': config.get('keep_best_checkpoints', 0),
          'best_metric': config.get('best_metric', 'accuracy')}


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """The kept checkpoint with the best validation metric; None if none carries one."""
  has_metric = [s for s in manager.all_steps() if manager.metrics(s) is not None]
  return manager.best_step() if has_metric else None


def save(manager: ocp.CheckpointManager, state: TrainState, data_iterator: Any = None,
         metrics: dict | None = None) -> None:
  """Starts an asynchronous save of `state` (and the iterator) at `state.step`, with the
  validation `metrics` that rank it among the best checkpoints when it has them."""
  items = {'state': ocp.args.StandardSave(_arrays(state))}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(int(state.step), args=ocp.args.Composite(**items), metrics=metrics)


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
