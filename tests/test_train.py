"""End to end: the command line trains on real CIFAR-10 images, logs, checkpoints and resumes."""

import json
import os
import shutil
import subprocess
import sys

import chex
import orbax.checkpoint as ocp
import pytest

STEPS_PER_EPOCH, EPOCHS = 16, 4  # 800 train images in batches of 50


def _train(cifar_small, workdir, *extra, cache_home=None):
  command = [
      sys.executable, '-m', 'jaxmodel.train', '--config=cifar', f'--workdir={workdir}',
      f'--config.dataset={cifar_small["name"]}', f'--config.data_dir={cifar_small["data_dir"]}',
      '--config.train_split=train[:80%]', '--config.eval_split=train[80%:]',
      '--config.model.widths=(16, 32, 64)', '--config.batch_size=50',
      '--config.optimizer.learning_rate=0.2', f'--config.num_epochs={EPOCHS}',
      '--config.checkpoint_every_steps=16', '--config.keep_checkpoints=10', *extra]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  if cache_home:
    env['XDG_CACHE_HOME'] = str(cache_home)
  result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _final_arrays(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  return ocp.StandardCheckpointer().restore(path)


@pytest.fixture(scope='module')
def finished_run(cifar_small, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  cache_home = tmp_path_factory.mktemp('cache')
  stdout = _train(cifar_small, workdir, cache_home=cache_home)
  assert os.listdir(cache_home / 'jaxmodel' / 'xla'), 'the compilation cache stayed empty'
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
                                                             tmp_path):
  workdir, _ = finished_run
  interrupted = str(tmp_path / 'interrupted')
  shutil.copytree(workdir, interrupted)
  # As if the run had died after its step-32 checkpoint.
  for step in ('48', '64'):
    shutil.rmtree(os.path.join(interrupted, 'checkpoints', step))
  os.remove(os.path.join(interrupted, 'summary.json'))
  stdout = _train(cifar_small, interrupted)
  assert f'resumed from {interrupted} at step 32' in stdout
  summary = json.load(open(os.path.join(interrupted, 'summary.json')))
  assert summary['step'] == STEPS_PER_EPOCH * EPOCHS
  # Same batches, same augmentation, same randomness: bitwise the same final model.
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
