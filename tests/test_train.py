"""End to end: the command line trains on real CIFAR-10 images, logs, checkpoints and resumes."""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxmodel import compile_cache

STEPS_PER_EPOCH, EPOCHS = 16, 4  # 800 train images in batches of 50


def _args(cifar_small, *extra):
  return [
      '--config=cifar', f'--config.dataset={cifar_small["name"]}',
      f'--config.data_dir={cifar_small["data_dir"]}',
      '--config.train_split=train[:80%]', '--config.eval_split=train[80%:]',
      '--config.model.widths=(16, 32, 64)', '--config.batch_size=50',
      '--config.optimizer.learning_rate=0.2', f'--config.num_epochs={EPOCHS}',
      '--config.checkpoint_every_steps=16', '--config.keep_checkpoints=10', *extra]


def _run(cifar_small, workdir, *extra, cache_home=None, **kwargs):
  command = [sys.executable, '-m', 'jaxmodel.train', *_args(cifar_small, *extra),
             f'--workdir={workdir}']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  if cache_home:
    env['XDG_CACHE_HOME'] = str(cache_home)
  return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, **kwargs)


def _train(cifar_small, workdir, *extra, cache_home=None):
  result = _run(cifar_small, workdir, *extra, cache_home=cache_home)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _final_arrays(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  return ocp.StandardCheckpointer().restore(path)


@pytest.fixture(scope='module')
def cache_home(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')


@pytest.fixture(scope='module')
def finished_run(cifar_small, tmp_path_factory, cache_home):
  workdir = str(tmp_path_factory.mktemp('run'))
  stdout = _train(cifar_small, workdir, cache_home=cache_home)
  xla_cache = cache_home / 'jaxmodel' / f'xla-cpu{compile_cache.cpu_threads()}'
  assert os.listdir(xla_cache), 'the compilation cache stayed empty'
  return workdir, stdout


def test_cli_run_learns_and_reports(finished_run):
  workdir, stdout = finished_run
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  assert summary['step'] == STEPS_PER_EPOCH * EPOCHS
  assert summary['eval_examples'] == 200  # every validation example, once
  # Chance is 0.10; 0.2 is over 4 standard deviations above it on 200 examples.
  assert summary['eval_accuracy'] > 0.2
  assert f'final validation accuracy {summary["eval_accuracy"]:.4f}' in stdout
  assert 'images/s' in stdout.splitlines()[-2]
  assert summary['flops_per_step'] > 0
  assert 0 < summary['model_flops_utilization'] < 1.5
  assert stdout.splitlines()[-1].startswith('model FLOPs utilization')


def test_cli_run_writes_config_metrics_and_tensorboard(finished_run):
  workdir, _ = finished_run
  config = json.load(open(os.path.join(workdir, 'config.json')))
  assert config['batch_size'] == 50 and config['model']['widths'] == [16, 32, 64]
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  evals = [r for r in records if 'eval_accuracy' in r]
  assert [r['step'] for r in evals] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
  assert all('train_loss' in r for r in records if 'eval_accuracy' not in r)
  events = os.listdir(os.path.join(workdir, 'tensorboard'))
  assert any(name.startswith('events.out.tfevents') for name in events)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert steps == [16, 32, 48, 64]


def test_resume_continues_at_the_right_step_to_the_same_model(finished_run, cifar_small,
                                                             tmp_path, cache_home):
  workdir, _ = finished_run
  interrupted = str(tmp_path / 'interrupted')
  shutil.copytree(workdir, interrupted)
  # As if the run had died after its step-32 checkpoint.
  for step in ('48', '64'):
    shutil.rmtree(os.path.join(interrupted, 'checkpoints', step))
  os.remove(os.path.join(interrupted, 'summary.json'))
  stdout = _train(cifar_small, interrupted, cache_home=cache_home)
  assert f'resumed from {interrupted} at step 32' in stdout
  assert 'loaded as saved by an earlier run' in stdout  # the step's executable, not retraced
  summary = json.load(open(os.path.join(interrupted, 'summary.json')))
  assert summary['step'] == STEPS_PER_EPOCH * EPOCHS
  # Same batches, same augmentation, same randomness: bitwise the same final model.
  chex.assert_trees_all_equal(_final_arrays(interrupted, 64), _final_arrays(workdir, 64))


def test_the_pipeline_decoding_every_epoch_resumes_to_the_same_model(finished_run, cifar_small,
                                                                    tmp_path, cache_home):
  workdir, stdout = finished_run
  assert 'images into memory' in stdout  # the cifar config decodes its splits once
  interrupted = _copy_stopped_at_32(workdir, tmp_path / 'interrupted')
  stdout = _train(cifar_small, interrupted, '--config.data.in_memory=False', cache_home=cache_home)
  assert f'resumed from {interrupted} at step 32' in stdout
  assert 'images into memory' not in stdout
  # The same batches from JPEGs decoded as they are read: bitwise the same final model.
  chex.assert_trees_all_equal(_final_arrays(interrupted, 64), _final_arrays(workdir, 64))


def test_resuming_with_another_config_is_refused(finished_run, cifar_small):
  workdir, _ = finished_run
  result = subprocess.run(
      [sys.executable, '-m', 'jaxmodel.train', '--config=cifar', f'--workdir={workdir}',
       '--config.batch_size=64'], capture_output=True, text=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 2
  assert 'holds a run with a different config' in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def _copy_stopped_at_32(workdir, target):
  """A copy of the finished run as if it had died after its step-32 checkpoint."""
  shutil.copytree(workdir, target)
  for step in ('48', '64'):
    shutil.rmtree(os.path.join(target, 'checkpoints', step))
  os.remove(os.path.join(target, 'summary.json'))
  return str(target)


def _complete_steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


def _error_line(result):
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  return result.stderr.strip().splitlines()[-1]


def test_sigterm_saves_then_sigkills_in_and_out_of_saves_all_resume_to_the_same_model(
    finished_run, cifar_small, tmp_path):
  workdir, _ = finished_run
  stopped = _copy_stopped_at_32(workdir, tmp_path / 'stopped')
  command = [sys.executable, '-m', 'jaxmodel.train', *_args(cifar_small), f'--workdir={stopped}']
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  for line in proc.stdout:  # the signal lands during training, between checkpoints
    if line.startswith('compiled the train step'):
      proc.send_signal(signal.SIGTERM)
      break
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  saved = _complete_steps(stopped)[-1]
  assert 32 < saved < 64  # not a checkpoint_every_steps multiple: saved because of the signal
  assert stdout.strip().splitlines()[-1] == (
      f'saved a checkpoint at step {saved} in {stopped}; rerun the same command to resume')

  # The chaos harness, reduced: rerunning resumes at `saved`; then, checkpointing every 4 steps,
  # a SIGKILL during a save and one at random, each resumed; the finished model is bitwise equal.
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'scripts'))
  import chaos_resume
  figures = chaos_resume.chaos(_args(cifar_small, '--config.checkpoint_every_steps=4'),
                               str(tmp_path / 'chaos'), kills=2, seed=1, reference=workdir,
                               start_from=stopped)
  assert figures['problems'] == []
  assert figures['kills'] == 2 and figures['kills_during_save'] >= 1
  assert figures['rounds_bitwise_equal'] == figures['rounds'] == 1
  assert figures['resumes_worked'] == figures['resumes'] == 3
  assert figures['damaged_checkpoints_rejected'] == 0


def test_a_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(cifar_small,
                                                                               tmp_path):
  workdir = str(tmp_path / 'diverged')
  result = _run(cifar_small, workdir, '--config.optimizer.learning_rate=1e4',
                '--config.checkpoint_every_steps=2', '--config.log_every_steps=100')
  assert result.returncode == 2
  line = _error_line(result)
  bad_step = int(re.search(r' is -?(?:nan|inf) at step (\d+)', line).group(1))
  good = _complete_steps(workdir)
  assert good and good[-1] < bad_step
  assert f'the last good checkpoint is step {good[-1]}' in line
  arrays = _final_arrays(workdir, good[-1])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(arrays)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_resuming_another_model_names_the_parameter_and_changes_nothing(finished_run,
                                                                        cifar_small):
  workdir, _ = finished_run
  config_before = open(os.path.join(workdir, 'config.json')).read()
  result = _run(cifar_small, workdir, '--config.model.widths=(8, 16, 32)')
  assert result.returncode == 2
  line = _error_line(result)
  assert re.search(r'\(params/\S+: \([\d, ]+\) in the checkpoint, \([\d, ]+\) now\)', line), line
  assert 'new --workdir' in line and '--config.init_from=WORKDIR' in line
  assert open(os.path.join(workdir, 'config.json')).read() == config_before
  assert _complete_steps(workdir) == [16, 32, 48, 64]


def _limit_file_size():
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_full_disk_while_saving_stops_cleanly_and_keeps_the_previous_checkpoint(
    finished_run, cifar_small, tmp_path):
  workdir, _ = finished_run
  stopped = _copy_stopped_at_32(workdir, tmp_path / 'full')
  # Checkpoint files are ~500 KB; a 64 KB file-size limit fails the step-48 save.
  result = _run(cifar_small, stopped, preexec_fn=_limit_file_size)
  assert result.returncode == 2
  line = _error_line(result)
  assert line.startswith(f'error: saving a checkpoint in {stopped}/checkpoints failed (File too '
                         f'large); the newest complete one (step 32) is intact')
  assert _complete_steps(stopped) == [16, 32]
  chex.assert_trees_all_equal(_final_arrays(stopped, 32), _final_arrays(workdir, 32))


def test_mfu_peak_is_the_larger_of_before_and_after_training(cifar_small, tmp_path, monkeypatch):
  # A shared host can run slower at the end of a long run than at its start; the end's peak
  # alone once made a run's MFU read 112%.
  from jaxmodel import metrics, train
  from jaxmodel.configs import cifar
  peaks = iter([4e12, 1e9])  # before training, after it
  monkeypatch.setattr(metrics, 'peak_matmul_flops', lambda: next(peaks))
  config = cifar.get_config()
  config.update_from_flattened_dict({
      'dataset': cifar_small['name'], 'data_dir': cifar_small['data_dir'],
      'train_split': 'train[:10%]', 'eval_split': 'train[90%:]', 'model.widths': (8, 16, 16),
      'batch_size': 50, 'num_epochs': 1, 'compilation_cache': False})
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['peak_matmul_flops_per_second'] == 4e12
  np.testing.assert_allclose(summary['model_flops_utilization'],
                             summary['train_flops_per_second'] / 4e12)
  assert next(peaks, None) is None  # measured twice
  # Resuming the finished run trains nothing: no peak, no MFU (next(peaks) would raise).
  resumed = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'model_flops_utilization' not in resumed
