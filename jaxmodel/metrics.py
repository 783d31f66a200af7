"""Where metrics go: a JSONL file and TensorBoard events in the workdir, and a progress display.

On a terminal the progress is a bar (step, epoch, loss, accuracy, images/s, ETA); elsewhere it is
one plain line per report, readable in a log file.
"""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from tensorboardX import SummaryWriter

from jaxmodel import compile_cache


class MetricWriter:
  """Appends {'step': ..., **metrics} to metrics.jsonl and writes TensorBoard scalars."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if enabled:
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self._jsonl.flush()
    for name, value in values.items():
      self._tensorboard.add_scalar(name, value, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def _terminal_width(stream) -> int:
  """Columns of the terminal `stream` writes to; 0 for a file, a pipe or a sizeless pty."""
  try:
    return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
  except (OSError, ValueError, AttributeError):
    return 0


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}' if hours else f'{minutes}:{seconds:02d}'


class Progress:
  """Reports training progress; ETA from the rate since the first report after compilation."""

  def __init__(self, total_steps: int, initial_step: int, enabled: bool = True,
               stream=sys.stderr):
    self.total_steps, self.enabled, self.stream = total_steps, enabled, stream
    self._bar = None
    if enabled and _terminal_width(stream) > 0:
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, file=stream, unit='step',
                            dynamic_ncols=True, smoothing=0.1)
    self._step = initial_step
    self._start = None  # (time, step) of the first report

  def update(self, step: int, epoch: float, fields: dict) -> None:
    if not self.enabled:
      return
    now = time.perf_counter()
    if self._start is None:
      self._start = (now, step)
    elapsed, done = now - self._start[0], step - self._start[1]
    eta = _duration((self.total_steps - step) * elapsed / done) if done else '?'
    text = ' '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in fields.items())
    if self._bar is not None:
      self._bar.set_postfix_str(f'epoch {epoch:.2f} {text}', refresh=False)
      self._bar.update(step - self._step)
    else:
      print(f'step {step}/{self.total_steps} epoch {epoch:.2f} {text} eta {eta}', file=self.stream,
            flush=True)
    self._step = step

  def write(self, line: str) -> None:
    """Prints a line without breaking the bar."""
    if self._bar is not None:
      self._bar.write(line, file=self.stream)
    elif self.enabled:
      print(line, file=self.stream, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def measure_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """The device's practical float32 peak: median FLOP/s of an n x n x n matmul, jitted.

  A model's FLOPs utilization (MFU) is its XLA-counted FLOPs per second over this number.
  """
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / float(np.median(times))


def peak_matmul_flops() -> float:
  """`measure_matmul_flops` with XLA's whole thread pool: the peak MFU is measured against.

  A run that gave XLA:CPU fewer threads than it has cores (parallel.cpu_threads, PJRT_NPROC)
  would measure only its threads' share of the machine in-process; a fresh process with one
  thread per core measures the machine (~3 s more each time; train.py measures before and after).
  """
  if compile_cache.cpu_threads() >= compile_cache.cpu_cores() or jax.default_backend() != 'cpu':
    return measure_matmul_flops()
  environment = {k: v for k, v in os.environ.items() if k != 'PJRT_NPROC'}
  result = subprocess.run(
      [sys.executable, '-c', 'from jaxmodel import metrics; print(metrics.measure_matmul_flops())'],
      env=environment, capture_output=True, text=True, timeout=600)
  if result.returncode != 0:  # e.g. no memory left for a second process: the run's own threads
    return measure_matmul_flops()
  return float(result.stdout.split()[-1])


class EarlyStopping:
  """Says when to stop: after `patience` evaluations in a row that did not improve the best value
  of the validation metric by more than `min_delta`, and from then on. Patience 0 never stops."""

  def __init__(self, metric: str = 'accuracy', patience: int = 0, min_delta: float = 0.0):
    self.higher_is_better = metric != 'loss'
    self.patience, self.min_delta = patience, min_delta
    self.best, self.best_step, self.evaluations_without_improvement = None, None, 0
    self.should_stop = False

  def update(self, step: int, value: float) -> bool:
    """Records the metric's `value` at `step`; True when training should stop."""
    gain = (value - self.best if self.higher_is_better else self.best - value) \
        if self.best is not None else float('inf')
    if gain > self.min_delta:
      self.best, self.best_step, self.evaluations_without_improvement = value, step, 0
    else:
      self.evaluations_without_improvement += 1
    self.should_stop |= 0 < self.patience <= self.evaluations_without_improvement
    return self.should_stop


def read_evaluations(workdir: str, up_to_step: int) -> list[dict]:
  """The validation records of metrics.jsonl up to `up_to_step`, one per step, in step order
  (a resumed run may have logged a step twice: the later record wins)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  by_step = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        if 'eval_accuracy' in record and record['step'] <= up_to_step:
          by_step[record['step']] = record
  return [by_step[s] for s in sorted(by_step)]


class StepProfiler:
  """A jax.profiler trace (TensorBoard's profile plugin and Perfetto read it) of the train steps
  that take the step counter from `start` to `stop`, written under `log_dir`."""

  def __init__(self, steps: tuple[int, int] | None, log_dir: str):
    self.steps, self.log_dir, self.active = steps, log_dir, False

  def before_step(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
      self.active = True

  def after_step(self, step: int, outputs) -> None:
    if self.active and step >= self.steps[1]:
      jax.block_until_ready(outputs)  # the trace must hold the steps' device work
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
