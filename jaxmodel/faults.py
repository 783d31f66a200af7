"""What keeps a run from losing work: preemption signals, non-finite checks, workdir checks.

SIGTERM (cluster preemption) and SIGINT (Ctrl-C) ask the loop to finish its step, save a
checkpoint and stop; a second signal stops at once. Non-finite losses are looked for at log and
checkpoint boundaries only (no extra device sync per step), and always before a state is saved.
"""

import logging
import math
import os
import signal
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteError(RuntimeError):
  """Training diverged; its message names the step."""


class Preempted(Exception):
  """The run stopped on a signal after saving checkpoint `step`."""

  def __init__(self, step: int):
    super().__init__(f'stopped on a signal after saving a checkpoint at step {step}')
    self.step = step


class Preemption:
  """Between install() and uninstall(), SIGTERM and SIGINT set `requested` instead of killing."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = None  # the signal's name once one arrived
    self._previous = {}

  def _handle(self, signum, frame):
    if self.requested:  # a second signal: the user means it
      self.uninstall()
      signal.raise_signal(signum)
      return
    self.requested = signal.Signals(signum).name
    print(f'{self.requested}: saving a checkpoint after this step, then stopping '
          f'(send it again to stop at once)', file=sys.stderr, flush=True)

  def install(self) -> 'Preemption':
    if threading.current_thread() is threading.main_thread():  # signals only reach that thread
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def uninstall(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


def hide_background_tracebacks() -> None:
  """Drops errors that Orbax's save threads log with tracebacks; the failure reaches the main
  thread, which reports it in one line. (Not called with --debug.)"""
  def keep(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR
  # Orbax logs through absl; its event loops' failing callbacks through the other two.
  for name in ('absl', 'asyncio', 'concurrent.futures'):
    logging.getLogger(name).addFilter(keep)
  sys.unraisablehook = lambda unraisable: None  # callbacks of those loops, at shutdown


def check_finite(history: list[dict], first_step: int) -> None:
  """Raises NonFiniteError naming the first step of `history` (step `first_step` first) whose
  loss or gradient norm is not finite. Reads the metrics from the device: call it sparingly.
  An entry holds one step's metrics, or several steps' stacked."""
  step = first_step
  for metrics in jax.device_get(history):
    values = {name: np.ravel(metrics[name]) for name in ('loss', 'grad_norm') if name in metrics}
    for offset in range(len(values['loss'])):
      for name, per_step in values.items():
        if not math.isfinite(per_step[offset]):
          raise NonFiniteError(f'{name} is {float(per_step[offset])} at step {step + offset}')
    step += len(values['loss'])


_STATE_FIELDS = ('params', 'model_state', 'opt_state', 'average')


@jax.jit
def _finite_fields(fields: dict) -> dict:
  """Per field, whether all its floating-point values are finite: one program for the state."""
  def all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.asarray(leaves)) if leaves else jnp.asarray(True)
  return {name: all_finite(tree) for name, tree in fields.items()}


def check_state_finite(state, step: int) -> None:
  """Raises NonFiniteError if any parameter, model state or optimizer state is not finite."""
  finite = jax.device_get(_finite_fields({f: getattr(state, f) for f in _STATE_FIELDS}))
  for field in _STATE_FIELDS:
    if not finite[field]:
      raise NonFiniteError(f'{field} became non-finite by step {step}')


def check_writable(workdir: str) -> str | None:
  """None if files can be created in `workdir` (created if needed), else the reason."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    return f'--workdir {workdir} is a file; pass a folder'
  probe = os.path.join(workdir, f'.write_test_{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    return f'cannot write to --workdir {workdir} ({e.strerror}); pass a writable folder'
  return None
