"""Checkpoints: one Orbax manager saves the train state and the data iterator's state together.

A checkpoint is the state's arrays (step, params, model state, optimizer state, RNG key), the
Grain iterator's position, so a resumed run continues with the exact next batch, and a JSON item
'run' holding the config's fingerprint and a SHA-256 digest of the arrays. Nothing is pickled:
arrays go through Orbax's StandardCheckpointHandler, the rest is JSON, so loading runs no code.

Saves are asynchronous; Orbax writes into a temporary folder and renames it when complete, so a
killed save is never listed as a checkpoint. A finished checkpoint that was later truncated or
damaged fails its digest (or cannot be read): `restore` warns, moves it to
WORKDIR/corrupt_checkpoints/ and falls back to the previous step.
"""

import hashlib
import logging
import os
import shutil
import sys
from typing import Any, Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxmodel.steps import TrainState

# Checkpoints saved between evaluations have no metric by design; Orbax warns on each one.
logging.getLogger('absl').addFilter(
    lambda record: 'did not provide metrics' not in record.getMessage())


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be resumed; its message is one line that says what to do."""


def _arrays(state: TrainState) -> dict:
  arrays = {'step': state.step, 'params': state.params, 'model_state': state.model_state,
            'opt_state': state.opt_state, 'rng': state.rng}
  if state.average is not None:  # a lookahead's
    arrays['average'] = state.average
  return arrays


def digest(tree: Any) -> str | None:
  """SHA-256 over the bytes, dtypes and shapes of every leaf (None if not all on this process)."""
  leaves = jax.tree.leaves(tree)
  if not all(getattr(x, 'is_fully_addressable', True) for x in leaves):
    return None
  sha = hashlib.sha256()
  for leaf in jax.device_get(leaves):
    leaf = np.asarray(leaf)
    sha.update(f'{leaf.dtype}{leaf.shape}'.encode())
    sha.update(np.ascontiguousarray(leaf).tobytes())
  return sha.hexdigest()


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
  # A save killed midway leaves a temporary folder that is never restored; clear it on start.
  options = ocp.CheckpointManagerOptions(
      create=True, preservation_policy=preserve,
      best_fn=(lambda m: m[best_metric]) if keep_best else None,
      best_mode='min' if best_metric == 'loss' else 'max', cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler(),
                     'run': ocp.JsonCheckpointHandler()})


_OS_REASONS = ('No space left on device', 'File too large', 'Disk quota exceeded',
               'Read-only file system', 'Permission denied')


def _save_failed(manager: ocp.CheckpointManager, error: Exception) -> CheckpointError:
  text = str(error)
  reason = next((r for r in _OS_REASONS if r in text), text.splitlines()[0][:200] if text else
                type(error).__name__)
  # From the folder, not the manager: its step list may hold the failed step.
  steps = [int(n) for n in os.listdir(str(manager.directory)) if n.isdigit()]
  newest = f'step {max(steps)}' if steps else 'none'
  return CheckpointError(
      f'saving a checkpoint in {manager.directory} failed ({reason}); the newest complete one '
      f'({newest}) is intact: free space or fix the workdir, then rerun the same command to '
      f'resume')


def best_options(config: Any) -> dict:
  return {'keep_best': config.get('keep_best_checkpoints', 0),
          'best_metric': config.get('best_metric', 'accuracy')}


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """The kept checkpoint with the best validation metric; None if none carries one."""
  has_metric = [s for s in manager.all_steps() if manager.metrics(s) is not None]
  return manager.best_step() if has_metric else None


def save(manager: ocp.CheckpointManager, state: TrainState, data_iterator: Any = None,
         metrics: dict | None = None, fingerprint: dict | None = None) -> None:
  """Starts an asynchronous save of `state` (and the iterator) at `state.step`, with the
  validation `metrics` that rank it among the best checkpoints when it has them.

  Raises CheckpointError if this or the previous save failed (e.g. the disk is full).
  """
  arrays = _arrays(state)
  items = {'state': ocp.args.StandardSave(arrays),
           'run': ocp.args.JsonSave({'config': fingerprint, 'sha256': digest(arrays)})}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  try:
    manager.save(int(state.step), args=ocp.args.Composite(**items), metrics=metrics)
  except Exception as e:
    raise _save_failed(manager, e) from e


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until pending saves are complete; CheckpointError if one failed."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise _save_failed(manager, e) from e


def _read_run(manager: ocp.CheckpointManager, step: int) -> dict:
  """The 'run' JSON item of `step`; {} for checkpoints written before it existed."""
  if not os.path.isdir(os.path.join(str(manager.directory), str(step), 'run')):
    return {}
  return manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))['run']


def saved_fingerprint(manager: ocp.CheckpointManager) -> dict | None:
  """The config fingerprint saved with the newest checkpoint (None if none or unreadable)."""
  step = manager.latest_step()
  try:
    return None if step is None else _read_run(manager, step).get('config')
  except Exception:  # damaged: restore() will say so and fall back
    return None


def _path(key_path) -> str:
  # Saved metadata has dicts and lists where the state has named tuples: compare by name/index.
  name = lambda k: getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))
  return '/'.join(str(name(k)) for k in key_path)


def _shapes(tree: Any) -> dict:
  return {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def first_shape_mismatch(saved: Any, template: Any) -> str | None:
  """'PATH: SHAPE in the checkpoint, SHAPE now' for the first array that differs, else None."""
  old, new = _shapes(saved), _shapes(template)
  order = ('params', 'model_state', 'opt_state')  # params first: they name the model's layers
  rank = lambda path: (order.index(path.split('/')[0]) if path.split('/')[0] in order else 3, path)
  for path in sorted(old.keys() | new.keys(), key=rank):
    if old.get(path) != new.get(path):
      show = lambda shape: 'missing' if shape is None else str(shape)
      return f'{path}: {show(old.get(path))} in the checkpoint, {show(new.get(path))} now'
  return None


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves a damaged step out of the manager's folder (kept for inspection, never restored)."""
  directory = str(manager.directory)
  target = os.path.join(os.path.dirname(directory), 'corrupt_checkpoints', str(step))
  os.makedirs(os.path.dirname(target), exist_ok=True)
  if os.path.exists(target):
    shutil.rmtree(target)
  shutil.move(os.path.join(directory, str(step)), target)
  manager.reload()
  return target


def _has_iterator_state(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether this process's Grain position was saved (not if the process count changed)."""
  name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'  # Grain's file naming
  return os.path.exists(os.path.join(str(manager.directory), str(step), 'data', name))


def restore(manager: ocp.CheckpointManager, state: TrainState, data_iterator: Any = None,
            step: int | None = None,
            check_config: Callable[[dict | None], None] | None = None) -> TrainState:
  """`state` with the arrays of checkpoint `step` (default: the newest valid one) and the iterator.

  `state` serves as the template: restored arrays take its shapes, dtypes and shardings; a
  checkpoint of other shapes raises CheckpointError naming the first differing array.
  `check_config(saved_fingerprint)` may raise to refuse a checkpoint of another config.
  Without `step`, a damaged newest checkpoint is moved aside with a warning and the previous one
  restored.
  """
  template = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(state))
  steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
  for candidate in steps:
    try:
      saved = manager.item_metadata(candidate)['state']
      if not jax.tree.leaves(saved):
        raise ValueError('its array metadata is missing')
      run = _read_run(manager, candidate)
    except Exception as e:  # unreadable metadata: a damaged checkpoint, not a mismatch
      error = e
    else:
      mismatch = first_shape_mismatch(saved, template)
      if mismatch:
        raise CheckpointError(
            f'checkpoint {candidate} in {manager.directory} is of another model ({mismatch}); '
            f'start fresh with a new --workdir, or fine-tune from it with '
            f'--config.init_from=WORKDIR')
      if check_config:
        check_config(run.get('config'))
      items = {'state': ocp.args.StandardRestore(template)}
      if data_iterator is not None and _has_iterator_state(manager, candidate):
        items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
      elif data_iterator is not None:
        print(f'checkpoint {candidate} holds no data position for {jax.process_count()} '
              f'process(es); the data order starts over', flush=True)
      try:
        arrays = manager.restore(candidate, args=ocp.args.Composite(**items))['state']
        error = None
        restored_digest = digest(arrays)  # None where this process holds only some shards
        if run.get('sha256') and restored_digest and restored_digest != run['sha256']:
          error = ValueError('its arrays do not match the digest saved with them')
      except Exception as e:
        error = e
      if error is None:
        return state.replace(**arrays)
    if step is not None:
      raise CheckpointError(f'checkpoint {candidate} in {manager.directory} cannot be read '
                            f'({str(error).splitlines()[0][:200]})')
    if jax.process_index() == 0:  # one process moves it; every process falls back alike
      moved = _move_aside(manager, candidate)
      print(f'warning: checkpoint {candidate} is damaged ({str(error).splitlines()[0][:200]}); '
            f'moved it to {moved}, falling back to the previous checkpoint', file=sys.stderr,
            flush=True)
  raise CheckpointError(f'no readable checkpoint left in {manager.directory} (damaged ones are in '
                        f'corrupt_checkpoints/); rerun the same command to start from scratch')
