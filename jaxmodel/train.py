"""Train and evaluate: python -m jaxmodel.train --config=cifar [--config.KEY=VALUE ...] [--workdir=DIR]

Rerunning the same command with the same --workdir resumes from the latest checkpoint.
"""

from jaxmodel import memory

if __name__ == '__main__':
  memory.use_huge_pages()  # may restart the process: first, before the imports below

import json
import os
import sys
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmodel import checkpoint, compile_cache, config as config_lib, data, device_data, faults
from jaxmodel import models, optim
from jaxmodel import metrics as metrics_lib
from jaxmodel import parallel, plots, text, trained
from jaxmodel.steps import TrainState, create_train_state, eval_step, get_loss, train_step

# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_CHANGES = ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                     'eval_batch_size', 'data.num_workers', 'data.prefetch', 'data_dir',
                     'compilation_cache', 'keep_best_checkpoints', 'profile_steps',
                     'parallel.strategy', 'parallel.mesh.data',
                     'parallel.mesh.fsdp', 'parallel.mesh.tensor', 'distributed.initialize',
                     'distributed.coordinator_address', 'distributed.num_processes',
                     'distributed.process_id', 'steps_per_dispatch', 'accuracy_marks',
                     'data.in_memory', 'log_grad_norm', 'parallel.cpu_threads')


class TrainError(RuntimeError):
  """A run that cannot start or go on; its message is one line that says what to do."""


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out |= _flatten(value, f'{prefix}{key}.')
    else:
      out[f'{prefix}{key}'] = value
  return out


def check_resumable(workdir: str, config: ml_collections.ConfigDict, saved: dict | None = None,
                    defer: tuple[str, ...] = ()) -> None:
  """Refuses to resume a workdir trained with a config that differs in what it trains.

  `saved` is the fingerprint stored with the checkpoint (default: WORKDIR/config.json). Keys
  starting with a `defer` prefix are skipped, left for the restore to report by parameter shape.
  A key the saved config lacks (added to jaxmodel since) counts as its default there.
  """
  path = os.path.join(workdir, 'config.json')
  if saved is None:
    if not os.path.exists(path):
      return
    with open(path) as f:
      saved = json.load(f)
  old = _flatten(config_lib.fingerprint(config_lib.base_config())) | _flatten(saved)
  new = _flatten(config_lib.fingerprint(config))
  changed = [k for k in sorted(old.keys() | new.keys())
             if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
             and not k.startswith(defer)]
  if changed:
    key = changed[0]
    raise TrainError(f'{workdir} holds a run with a different config ({key}: {old.get(key)!r} '
                     f'there, {new.get(key)!r} now); resume it with the same config, start fresh '
                     f'with a new --workdir, or fine-tune from it with --config.init_from=WORKDIR')


def evaluate(eval_fn, state: TrainState, batches: Iterable[dict]) -> dict:
  """Loss and accuracy over every example of `batches` (padding masked out)."""
  totals = None
  for batch in batches:
    sums = eval_fn(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss_sum']) / count, 'accuracy': float(totals['correct']) / count,
          'count': int(count)}


def _mean_metrics(history: list[dict]) -> dict:
  """The mean of each metric over the steps of `history` (a call's may hold several steps)."""
  history = jax.device_get(history)
  return {k: float(np.mean(np.concatenate([np.ravel(m[k]) for m in history]))) for k in history[0]}


def _steps_to_boundary(step: int, periods: Iterable[int], marks: Iterable[int]) -> int:
  """Steps from `step` to the next multiple of a period or the next mark after it."""
  return min([p - step % p for p in periods] + [m - step for m in marks if m > step])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       preemption: faults.Preemption | None = None) -> dict:
  """Trains `config` in `workdir` (resuming from its latest checkpoint) and returns a summary.

  Once `preemption.requested` is set (by a signal), the step that runs is finished, a checkpoint
  saved and faults.Preempted raised.
  """
  preemption = preemption or faults.Preemption()  # not installed: never requested
  wall_start = time.perf_counter()
  # Before anything touches the devices; the compilation cache depends on the threads.
  parallel.set_cpu_threads(config.parallel.cpu_threads)
  parallel.initialize_distributed(config.distributed)
  if config.compilation_cache:
    compile_cache.enable_xla_cache()
  is_main = jax.process_index() == 0
  unwritable = faults.check_writable(workdir)
  if unwritable:
    raise TrainError(unwritable)
  manager = checkpoint.make_manager(workdir, config.keep_checkpoints,
                                    **checkpoint.best_options(config))
  # Model changes are reported at restore, by the first parameter whose shape differs.
  check_resumable(workdir, config, checkpoint.saved_fingerprint(manager), defer=('model.',))

  process_count = jax.process_count()
  mesh = parallel.make_mesh(config.parallel.mesh)
  parallel.check_strategy(config.parallel.strategy, mesh)
  parallel.check_batch_size(config.batch_size, mesh)
  local_batch = config.batch_size // process_count
  train_source, info = data.open_split(config.dataset, config.train_split, config.data_dir,
                                       config.download)
  eval_source, _ = data.open_split(config.dataset, config.eval_split, config.data_dir)
  vocab = None
  if text.is_text(info):  # character-level language modelling on windows of block_size
    train_source, eval_source, vocab = text.char_windows(train_source, eval_source, info,
                                                         config.model.get('block_size', 128))
    if is_main:
      text.save_vocabulary(workdir, vocab)
  steps_per_epoch = data.steps_per_epoch(len(train_source), local_batch, process_count)
  if steps_per_epoch == 0:
    raise TrainError(f'{config.train_split} has {len(train_source)} examples, fewer than one '
                     f'batch of {config.batch_size}; lower --config.batch_size')
  total_steps = steps_per_epoch * config.num_epochs

  model_kwargs = {k: v for k, v in config.model.items() if k != 'name'}
  if vocab:
    model_kwargs['vocab_size'] = len(vocab)
  else:
    model_kwargs['num_classes'] = info.features['label'].num_classes
  model = parallel.prepare_model(models.get_model(config.model.name, **model_kwargs),
                                 config.parallel.strategy)
  tx = optim.make_optimizer(config.optimizer, total_steps)
  lookahead = optim.make_lookahead(config.optimizer, total_steps)
  loss_fn = get_loss(config.loss, config.label_smoothing)
  rng = jax.random.PRNGKey(config.seed)
  if vocab:
    example = jnp.zeros((local_batch, train_source.block_size), jnp.int32)
    train_preprocess = eval_preprocess = text.Tokens()
    decode = {'decode': text.as_arrays}
  else:
    example = jnp.zeros((local_batch, *info.features['image'].shape))
    train_preprocess = data.preprocess_from_config(config, train=True)
    eval_preprocess = data.preprocess_from_config(config, train=False)
    decode = {}
  state = parallel.create_state(
      lambda: create_train_state(model, tx, example, rng, loss_fn, config.compute_dtype,
                                 lookahead), mesh)

  if config.data.on_device:
    if process_count > 1 or vocab:
      raise TrainError('data.on_device holds a whole image split in one process; use the Grain '
                       'pipeline (--config.data.on_device=False) with several processes or text')
    augment = device_data.augment_from_config(config)
    device_batches = device_data.TrainBatches(len(train_source), local_batch, config.seed, augment)
    train_arrays = jax.device_put(data.load_split(train_source), parallel.replicated(mesh))
    eval_arrays = data.load_split(eval_source)  # read once, not every epoch
    train_iter = None  # no pipeline state to checkpoint: the step number says where the data is
    make_batch = device_batches.from_inputs
    eval_batches = lambda: device_data.eval_batches(eval_arrays, augment, config.eval_batch_size)
  else:
    make_batch = None  # batches come from the Grain pipeline
    if config.data.in_memory:
      if vocab:
        raise TrainError('data.in_memory holds decoded image splits; text is read as it is: set '
                         '--config.data.in_memory=False')
      load_start = time.perf_counter()
      train_source, eval_source = data.InMemory(train_source), data.InMemory(eval_source)
      print(f'decoded {len(train_source) + len(eval_source):,} images into memory in '
            f'{time.perf_counter() - load_start:.1f} s', flush=True)
    train_iter = iter(data.train_dataset(
        train_source, train_preprocess, local_batch, seed=config.seed,
        process_index=jax.process_index(), process_count=process_count,
        prefetch=config.data.prefetch, num_workers=config.data.num_workers, **decode))
    eval_batches = lambda: data.eval_batches(
        eval_source, eval_preprocess, config.eval_batch_size,
        process_index=jax.process_index(), process_count=process_count, **decode)

  fingerprint = config_lib.fingerprint(config)
  init_seconds = 0.0
  if manager.latest_step() is not None:
    state = checkpoint.restore(manager, state, train_iter,
                               check_config=lambda saved: check_resumable(workdir, config, saved))
    print(f'resumed from {workdir} at step {int(state.step)}', flush=True)
  elif config.init_from:
    params, model_state, fresh = trained.init_from(config.init_from, config, state.params,
                                                   state.model_state)
    state = state.restart_from(params, model_state)
    print(f'initialized from {config.init_from}'
          + (f'; re-initialized {", ".join(sorted(fresh))} (not there with this shape, e.g. '
             f'another class count)' if fresh else ''), flush=True)
  else:
    if config.data.on_device:  # in memory already
      sample = lambda: np.asarray(augment.normalize(train_arrays['image'][:5000]))
    else:
      sample = lambda: next(data.eval_batches(train_source, eval_preprocess, 5000))['image']
    init_start = time.perf_counter()
    params = models.init_from_data(model, state.params, sample)
    state = state.restart_from(params)  # a lookahead average must start from these params
    init_seconds = time.perf_counter() - init_start  # airbench counts its whitening init
  if is_main:  # only now: a refused resume leaves the old config.json alone
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_lib.to_json(config))
  state = parallel.put(state, parallel.state_shardings(state, mesh))  # e.g. a host-computed init

  print(f'{config.model.name}: {models.count_params(state.params):,} params | '
        f'{config.dataset} {config.train_split} ({len(train_source)}) -> '
        f'{config.eval_split} ({len(eval_source)}) | batch {config.batch_size} | '
        f'{steps_per_epoch} steps/epoch x {config.num_epochs} epochs | '
        f'{parallel.describe(mesh, config.parallel.strategy)}', flush=True)

  step = int(state.step)
  inputs = train_iter if train_iter is not None else device_data.StepInputs(
      device_batches, train_arrays, step)
  batch = next(inputs)
  compile_start = time.perf_counter()
  compiler = compile_cache.compile_plain
  if config.compilation_cache:  # what the step depends on beyond its arguments and the code
    compiler = compile_cache.Compiler(
        [config_lib.to_json(config), len(train_source), total_steps, model_kwargs],
        mesh.devices.flat)
  train_fn, eval_fn = parallel.compile_steps(config.parallel.strategy, mesh, state, batch,
                                             make_batch, config.steps_per_dispatch,
                                             'none' if vocab else config.eval_tta, compiler,
                                             config.log_grad_norm)
  # Compiles the check before every save (a quarter second, not to be timed as training), and
  # checks a restored or initialized state.
  faults.check_state_finite(state, step)
  compile_seconds = time.perf_counter() - compile_start
  flops_per_step = (train_fn.cost_analysis() or {}).get('flops', 0.0)
  loaded = getattr(compiler, 'loaded', [])
  print(f'compiled the train step in {compile_seconds:.2f} s ({flops_per_step / 1e9:.2f} GFLOP '
        f'per step{"; loaded as saved by an earlier run" if loaded else ""})', flush=True)
  # The machine's speed drifts over a long run on a shared host: the MFU's peak is the larger
  # of a measurement now and one after training, so a slow end cannot read as MFU over 100%.
  peak_before_training = (metrics_lib.peak_matmul_flops()
                          if flops_per_step and step < total_steps else 0.0)

  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  progress = metrics_lib.Progress(total_steps, step, enabled=is_main)
  stopper = metrics_lib.EarlyStopping(config.best_metric, config.early_stopping_patience,
                                      config.early_stopping_min_delta)
  evaluations = metrics_lib.read_evaluations(workdir, step)  # a resumed run's
  for record in evaluations:
    stopper.update(record['step'], record[f'eval_{config.best_metric}'])
  # Training time so far (data-dependent init and train steps; not compiling, not evaluating).
  seconds_before = (evaluations[-1].get('train_seconds', 0.0) if evaluations
                    else init_seconds)
  if stopper.should_stop:
    print(f'early stopping had ended this run at step {step}; nothing left to train', flush=True)
  profile_steps = config_lib.profile_range(config.profile_steps) if config.profile_steps else None
  profiler = metrics_lib.StepProfiler(profile_steps, os.path.join(workdir, 'profile'))
  # Several steps per call only between the steps where the loop logs, evaluates or saves.
  periods = (config.log_every_steps, steps_per_epoch, config.checkpoint_every_steps)
  marks = (total_steps, *(profile_steps or ()))
  history, eval_metrics = [], None
  train_seconds, trained_images = 0.0, 0
  interval_start, interval_step = time.perf_counter(), step
  try:
    while step < total_steps and not stopper.should_stop:
      profiler.before_step(step)
      call_steps = config.steps_per_dispatch
      if _steps_to_boundary(step, periods, marks) < call_steps:
        call_steps = 1
      # Dispatched: runs while the host goes on.
      state, step_metrics = train_fn(state, batch, call_steps)
      step += call_steps
      for _ in range(call_steps - 1):  # the inputs the call's other steps took
        next(inputs)
      profiler.after_step(step, step_metrics)
      history.append(step_metrics)
      end_of_epoch = step % steps_per_epoch == 0
      if step % config.log_every_steps == 0 or end_of_epoch or step == total_steps:
        faults.check_finite(history, interval_step + 1)
        train_metrics = _mean_metrics(history)
        history = []
        seconds = time.perf_counter() - interval_start
        images_per_second = (step - interval_step) * config.batch_size / seconds
        train_seconds += seconds
        trained_images += (step - interval_step) * config.batch_size
        writer.write(step, {f'train_{k}': v for k, v in train_metrics.items()}
                     | {'images_per_second': images_per_second})
        progress.update(step, step / steps_per_epoch,
                        {'loss': train_metrics['loss'], 'acc': train_metrics['accuracy'],
                         'img/s': round(images_per_second)})
        interval_start, interval_step = time.perf_counter(), step
      evaluated = end_of_epoch or step == total_steps
      if evaluated:
        eval_metrics = evaluate(eval_fn, state, eval_batches())
        record = ({f'eval_{k}': v for k, v in eval_metrics.items() if k != 'count'}
                  | {'train_seconds': seconds_before + train_seconds})
        writer.write(step, record)
        evaluations.append({'step': step, **record})
        progress.write(f'epoch {step / steps_per_epoch:.2f} step {step}: validation accuracy '
                       f'{eval_metrics["accuracy"]:.4f} loss {eval_metrics["loss"]:.4f}')
        interval_start = time.perf_counter()  # evaluation time is not training time
        if stopper.update(step, eval_metrics[config.best_metric]):
          progress.write(f'early stopping at step {step}: validation {config.best_metric} has '
                         f'not improved for {config.early_stopping_patience} evaluations (best '
                         f'{stopper.best:.4f} at step {stopper.best_step})')
      # Every evaluation is saved with its metrics when the best checkpoints are kept.
      if (step % config.checkpoint_every_steps == 0 or step == total_steps or stopper.should_stop
          or (evaluated and config.keep_best_checkpoints) or preemption.requested):
        faults.check_finite(history, interval_step + 1)  # never save a diverged state
        faults.check_state_finite(state, step)
        # The iterator has yielded exactly `step` batches.
        checkpoint.save(manager, state, train_iter, metrics=(
            {k: eval_metrics[k] for k in ('accuracy', 'loss')} if evaluated else None),
                        fingerprint=fingerprint)
        if preemption.requested and step < total_steps and not stopper.should_stop:
          checkpoint.wait(manager)
          raise faults.Preempted(step)
      if step < total_steps and not stopper.should_stop:
        batch = next(inputs)
  except faults.NonFiniteError as e:
    checkpoint.wait(manager)
    raise faults.NonFiniteError(
        f'{e}; the last good checkpoint is step {manager.latest_step()} in {workdir}; lower '
        f'--config.optimizer.learning_rate or set --config.optimizer.grad_clip_norm and start '
        f'fresh with a new --workdir (or fine-tune from it with --config.init_from={workdir})'
    ) from None
  finally:
    profiler.stop()
    checkpoint.wait(manager)
    progress.close()
    writer.close()

  if eval_metrics is None:  # resumed a finished run
    eval_metrics = evaluate(eval_fn, state, eval_batches())
  summary = {
      'step': step, 'eval_accuracy': eval_metrics['accuracy'], 'eval_loss': eval_metrics['loss'],
      'eval_examples': eval_metrics['count'], 'wall_seconds': time.perf_counter() - wall_start,
      'train_images_per_second': trained_images / train_seconds if train_seconds else None,
      'compile_seconds': compile_seconds, 'flops_per_step': flops_per_step,
      'stopped_early': stopper.should_stop, 'best_step': stopper.best_step,
      'seconds_to_accuracy': {
          f'{mark:g}': next((r.get('train_seconds') for r in evaluations
                             if r['eval_accuracy'] >= mark), None)
          for mark in config.accuracy_marks},
  }
  if vocab:  # per character: positions are the examples of a language model
    summary['eval_bits_per_character'] = eval_metrics['loss'] / np.log(2)
    if summary['train_images_per_second']:
      summary['train_tokens_per_second'] = summary['train_images_per_second'] * example.shape[1]
  if summary['train_images_per_second'] and flops_per_step:
    achieved = flops_per_step * summary['train_images_per_second'] / local_batch
    peak = max(peak_before_training, metrics_lib.peak_matmul_flops())
    summary |= {'train_flops_per_second': achieved, 'peak_matmul_flops_per_second': peak,
                'model_flops_utilization': achieved / peak}
  if is_main:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
    plots.learning_curves(workdir)
    rate = summary['train_images_per_second']
    print(f'final validation accuracy {summary["eval_accuracy"]:.4f} '
          f'({summary["eval_examples"]} examples) | wall time {summary["wall_seconds"]:.0f} s | '
          + (f'{rate:.0f} images/s' if rate else 'no steps left to train'), flush=True)
    if summary['seconds_to_accuracy']:
      print('training time to validation accuracy: ' + ', '.join(
          f'{mark}: ' + (f'{seconds:.0f} s' if seconds is not None else 'not reached')
          for mark, seconds in summary['seconds_to_accuracy'].items()), flush=True)
    if vocab:
      print(f'validation loss {summary["eval_loss"]:.4f} nats = '
            f'{summary["eval_bits_per_character"]:.3f} bits per character', flush=True)
    if 'model_flops_utilization' in summary:
      print(f'model FLOPs utilization {summary["model_flops_utilization"]:.0%}: '
            f'{summary["train_flops_per_second"] / 1e9:.1f} GFLOP/s (XLA cost analysis, oneDNN '
            f'convolutions added) of a {summary["peak_matmul_flops_per_second"] / 1e9:.1f} '
            f'GFLOP/s float32 matmul measured on this {jax.devices()[0].platform}', flush=True)
  return summary


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  debug = '--debug' in argv
  try:
    config, spec, workdir, debug = config_lib.parse_command_line(argv, 'train')
    if workdir is None:
      name = os.path.splitext(os.path.basename(spec))[0]
      workdir = os.path.join('runs', f'{name}-{time.strftime("%Y%m%d-%H%M%S")}')
    print(f'workdir {workdir} | config {spec}: ' + config_lib.summary(
        config, ['model.name', 'dataset', 'batch_size', 'num_epochs', 'optimizer.name',
                 'optimizer.learning_rate', 'optimizer.schedule']), flush=True)
    if not debug:
      faults.hide_background_tracebacks()
    # SIGTERM (preemption) or Ctrl-C: finish the step, save, exit 0; a second signal stops at once.
    preemption = faults.Preemption().install()
    try:
      train_and_evaluate(config, workdir, preemption)
    finally:
      preemption.uninstall()
  except faults.Preempted as e:
    print(f'saved a checkpoint at step {e.step} in {workdir}; rerun the same command to resume',
          flush=True)
    return 0
  except (config_lib.ConfigError, data.DataError, TrainError, checkpoint.CheckpointError,
          faults.NonFiniteError, ValueError, OSError) as e:
    if debug:
      raise
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, OSError):  # disk full, read-only or vanished files while running
      message = (f'{message}; free space or fix the workdir, then rerun the same command to '
                 f'resume from the latest checkpoint')
    print(f'error: {message}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('interrupted; rerun the same command to resume from the latest checkpoint',
          file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
