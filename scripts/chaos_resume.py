"""Chaos test of exact resume: SIGKILL a real training run at random moments, resume, compare.

  python scripts/chaos_resume.py [--kills 20] [--root /tmp/chaos] [--seed 0]
                                 [--data_dir D --dataset cifar10_small] [--reference WORKDIR]

Trains a tiny airbench on 1,000 real CIFAR-10 images (prepared from the shared tar with
--max_per_class unless --data_dir already holds --dataset), checkpointing every 4 steps with
asynchronous saves. First one uninterrupted run (the reference), then rounds: each round starts a
fresh workdir and reruns the same command until it finishes; while kills are left, every attempt
is SIGKILLed, alternately at a uniformly random moment of the training part of a run (after
the train step compiled, over the reference's training time) and while a checkpoint is being
written (a temporary checkpoint folder exists). A round's final arrays (params, model
state, optimizer state, RNG key, step) must be bitwise equal to the reference's.

A resume worked when the next attempt restored exactly the newest checkpoint that was complete
at the kill (or started fresh if none was) and went on without error. Partial checkpoints are the
temporary folders kills left behind (never listed, never restored); damaged ones are complete
checkpoints the restore had to reject (there should be none).
Prints the figures and exits 0 only if every resume worked and every round was bitwise equal.
Wall times mean nothing on a shared machine; the figures are counts.
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import numpy as np

SHARED_TAR = os.environ.get('JAXMODEL_CIFAR_TAR', os.path.join(
    os.path.dirname(__file__), '..', '..', 'shared', 'data', 'cifar10-jpeg-train.tar.gz'))


def train_args(dataset: str, data_dir: str) -> list[str]:
  """The tiny real run: 800 train images, batch 50, 2 epochs of 16 steps, checkpoint every 4."""
  return [
      '--config=cifar', f'--config.dataset={dataset}', f'--config.data_dir={data_dir}',
      '--config.train_split=train[:80%]', '--config.eval_split=train[80%:]',
      '--config.model.widths=(16, 32, 64)', '--config.batch_size=50',
      '--config.optimizer.learning_rate=0.2', '--config.num_epochs=2',
      '--config.checkpoint_every_steps=4', '--config.keep_checkpoints=3']


def _checkpoints(workdir: str) -> tuple[list[int], list[str]]:
  """(complete steps, temporary folders) in WORKDIR/checkpoints."""
  try:
    names = os.listdir(os.path.join(workdir, 'checkpoints'))
  except FileNotFoundError:
    return [], []
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if 'tmp' in n]


def _training_seconds(reference: str, start_from: str | None) -> float:
  """The seconds of train steps the reference ran past `start_from`'s newest checkpoint, from its
  summary.json, shortened by a margin: a random kill within them lands while a run trains."""
  summary = json.load(open(os.path.join(reference, 'summary.json')))
  batch_size = json.load(open(os.path.join(reference, 'config.json')))['batch_size']
  done = _checkpoints(start_from)[0][-1] if start_from else 0
  rate = summary.get('train_images_per_second')
  return 0.8 * (summary['step'] - done) * batch_size / rate if rate else 30.0


def final_arrays(workdir: str) -> dict:
  import orbax.checkpoint as ocp  # only here: the harness itself needs no JAX
  steps, _ = _checkpoints(workdir)
  return ocp.StandardCheckpointer().restore(
      os.path.join(os.path.abspath(workdir), 'checkpoints', str(steps[-1]), 'state'))


def bitwise_equal(a, b) -> bool:
  import jax
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  return tree_a == tree_b and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y, equal_nan=True)
      for x, y in zip(leaves_a, leaves_b))


class Runner:
  """Starts `python -m jaxmodel.train ARGS --workdir=W` and logs each attempt to W.logs/."""

  def __init__(self, args: list[str], env: dict):
    self.args, self.env, self.attempts = args, env, 0

  def start(self, workdir: str) -> tuple[subprocess.Popen, str]:
    self.attempts += 1
    log = f'{workdir}.logs/{self.attempts:03d}.txt'
    os.makedirs(os.path.dirname(log), exist_ok=True)
    out = open(log, 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'jaxmodel.train', *self.args,
                             f'--workdir={workdir}'], stdout=out, stderr=subprocess.STDOUT,
                            env=self.env)
    out.close()
    return proc, log


def _temporary_folders(workdir: str) -> set:
  found = set()
  for name in _checkpoints(workdir)[1]:
    try:
      stat = os.stat(os.path.join(workdir, 'checkpoints', name))
      found.add((name, stat.st_ino, stat.st_mtime_ns))
    except FileNotFoundError:  # finished (renamed) meanwhile
      pass
  return found


def _wait_for_text(proc: subprocess.Popen, log: str, text: str, deadline: float) -> None:
  while time.monotonic() < deadline and proc.poll() is None:
    if text in open(log).read():
      return
    time.sleep(0.05)


def _wait_for_save(proc: subprocess.Popen, workdir: str, deadline: float) -> bool:
  """Polls until a new checkpoint is being written while an older one is complete (True: the
  resume must fall back past the partial one), or the process ends/deadline (False).

  Folders left by an earlier kill don't count: the restarted run deletes them on start."""
  old = _temporary_folders(workdir)
  while time.monotonic() < deadline and proc.poll() is None:
    if _temporary_folders(workdir) - old and _checkpoints(workdir)[0]:
      return True
    time.sleep(0.002)
  return False


def chaos(args: list[str], root: str, kills: int, seed: int = 0, reference: str | None = None,
          start_from: str | None = None, env: dict | None = None, log=print) -> dict:
  """Runs the reference (unless given) and kill rounds; returns the figures.

  Each round starts from an empty workdir, or from a copy of `start_from` (a partly trained
  workdir of the same run; its newest checkpoint is where the first attempt resumes).
  """
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  runner = Runner(args, env)
  rng = random.Random(seed)
  if reference is None:
    reference = os.path.join(root, 'reference')
    proc, out = runner.start(reference)
    _wait_for_text(proc, out, 'compiled the train step', float('inf'))
    start = time.monotonic()
    if proc.wait() != 0:
      raise SystemExit(f'the reference run failed; see {out}')
    run_seconds = time.monotonic() - start  # from the compiled step to the end
  else:
    run_seconds = _training_seconds(reference, start_from)
  expected = final_arrays(reference)
  figures = {'kills': 0, 'kills_during_save': 0, 'resumes': 0, 'resumes_worked': 0,
             'rounds': 0, 'rounds_bitwise_equal': 0, 'partial_checkpoints_left': 0,
             'damaged_checkpoints_rejected': 0, 'failed_attempts': 0, 'problems': []}
  while figures['kills'] < kills:
    figures['rounds'] += 1
    workdir = os.path.join(root, f'round{figures["rounds"]}')
    shutil.rmtree(workdir, ignore_errors=True)
    expect_step = None  # the step the next attempt must resume from (None: start fresh)
    if start_from:
      shutil.copytree(start_from, workdir)
      expect_step = _checkpoints(workdir)[0][-1]
    while True:
      proc, out = runner.start(workdir)
      killing = figures['kills'] < kills
      if killing:
        during_save = figures['kills'] % 2 == 0
        if during_save:
          during_save = _wait_for_save(proc, workdir, time.monotonic() + 600)
        else:
          _wait_for_text(proc, out, 'compiled the train step', time.monotonic() + 600)
          deadline = time.monotonic() + rng.uniform(0, run_seconds)
          while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        killed = proc.poll() is None
        if killed:
          proc.kill()  # SIGKILL: no handler runs, no save completes
        proc.wait()
      else:
        killed = False
        proc.wait()
      text = open(out).read()
      figures['damaged_checkpoints_rejected'] += text.count('is damaged')
      if expect_step is not None or 'resumed from' in text:
        resumed = re.search(r'resumed from .* at step (\d+)', text)
        got = int(resumed.group(1)) if resumed else None
        if resumed or 'compiled the train step' in text:  # this attempt got past its restore
          figures['resumes'] += 1
          if got == expect_step:
            figures['resumes_worked'] += 1
          else:
            figures['problems'].append(f'{out}: resumed at {got}, expected {expect_step}')
      if killed:
        figures['kills'] += 1
        figures['kills_during_save'] += during_save
        steps, partial = _checkpoints(workdir)
        figures['partial_checkpoints_left'] += len(partial)
        expect_step = steps[-1] if steps else None
        log(f'kill {figures["kills"]}/{kills} ({"during a save" if during_save else "random"}): '
            f'complete checkpoints {steps}, partial {partial}')
        continue
      if proc.returncode != 0:
        figures['failed_attempts'] += 1
        figures['problems'].append(f'{out}: exit {proc.returncode}')
        break
      equal = bitwise_equal(final_arrays(workdir), expected)
      figures['rounds_bitwise_equal'] += equal
      log(f'round {figures["rounds"]} finished: final arrays '
          f'{"bitwise equal to" if equal else "DIFFERENT from"} the reference')
      break
  return figures


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--root', default='/tmp/chaos_resume')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--dataset', default='cifar10_small')
  parser.add_argument('--data_dir', default=None, help='default: ROOT/tfds, prepared if missing')
  parser.add_argument('--tar', default=SHARED_TAR)
  parser.add_argument('--max_per_class', type=int, default=100)
  parser.add_argument('--reference', default=None, help='an uninterrupted workdir to compare to')
  flags = parser.parse_args()
  data_dir = flags.data_dir or os.path.join(flags.root, 'tfds')
  if not os.path.isdir(os.path.join(data_dir, flags.dataset)):
    from jaxmodel.prepare import prepare_image_folder
    prepare_image_folder(flags.tar, flags.dataset, data_dir, max_per_class=flags.max_per_class)
  shutil.rmtree(os.path.join(flags.root, 'reference'), ignore_errors=True)
  start = time.monotonic()
  f = chaos(train_args(flags.dataset, data_dir), flags.root, flags.kills, flags.seed,
            flags.reference)
  print(f'kills tried: {f["kills"]} ({f["kills_during_save"]} while a checkpoint was being '
        f'written) over {f["rounds"]} rounds')
  print(f'resumes that worked: {f["resumes_worked"]} of {f["resumes"]}')
  print(f'final params bitwise equal to the uninterrupted run: {f["rounds_bitwise_equal"]} of '
        f'{f["rounds"]} rounds')
  print(f'partial checkpoints left by kills (never restored): {f["partial_checkpoints_left"]}; '
        f'damaged complete checkpoints rejected on restore: {f["damaged_checkpoints_rejected"]}')
  print(f'failed attempts: {f["failed_attempts"]}; wall {time.monotonic() - start:.0f} s')
  for problem in f['problems']:
    print(f'problem: {problem}')
  ok = (not f['problems'] and f['resumes_worked'] == f['resumes']
        and f['rounds_bitwise_equal'] == f['rounds'])
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
