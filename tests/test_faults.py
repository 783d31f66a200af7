"""Faults that must not lose work: signals, divergence, unwritable workdirs."""

import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import pytest

from jaxmodel import faults


def test_the_first_non_finite_step_is_named():
  history = [{'loss': jnp.float32(2.0), 'grad_norm': jnp.float32(1.0)},
             {'loss': jnp.float32(1.5), 'grad_norm': jnp.float32(jnp.inf)},
             {'loss': jnp.float32(jnp.nan), 'grad_norm': jnp.float32(jnp.nan)}]
  faults.check_finite(history[:1], 10)
  with pytest.raises(faults.NonFiniteError, match='grad_norm is inf at step 11'):
    faults.check_finite(history, 10)


def test_a_non_finite_state_is_caught_before_saving():
  class State:
    params = {'w': jnp.ones(3)}
    model_state = {}
    opt_state = ({'count': jnp.zeros((), jnp.int32)}, {'mu': jnp.array([0.0, jnp.nan])})
    average = None  # no lookahead
  with pytest.raises(faults.NonFiniteError, match='opt_state became non-finite by step 7'):
    faults.check_state_finite(State, 7)
  State.opt_state = ()
  faults.check_state_finite(State, 7)
  State.average = {'params': {'w': jnp.array([1.0, jnp.inf, 1.0])}, 'model_state': {}}
  with pytest.raises(faults.NonFiniteError, match='average became non-finite by step 7'):
    faults.check_state_finite(State, 7)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_asks_to_stop_and_handlers_come_back(signum, capsys):
  before = signal.getsignal(signum)
  preemption = faults.Preemption().install()
  try:
    os.kill(os.getpid(), signum)
    assert preemption.requested == signal.Signals(signum).name
  finally:
    preemption.uninstall()
  assert signal.getsignal(signum) is before
  assert 'saving a checkpoint after this step' in capsys.readouterr().err


def test_a_workdir_that_is_a_file_or_inside_one(tmp_path):
  afile = tmp_path / 'afile'
  afile.write_text('keep me')
  assert 'is a file; pass a folder' in faults.check_writable(str(afile))
  assert 'cannot write to --workdir' in faults.check_writable(str(afile / 'sub'))
  assert afile.read_text() == 'keep me'
  assert faults.check_writable(str(tmp_path / 'new' / 'dir')) is None
  assert os.listdir(tmp_path / 'new' / 'dir') == []  # the probe file is gone


def test_a_read_only_workdir(tmp_path):
  workdir = tmp_path / 'ro'
  workdir.mkdir()
  if os.geteuid() == 0:  # root writes through permissions; the immutable flag stops it
    if subprocess.run(['chattr', '+i', str(workdir)], capture_output=True).returncode:
      pytest.skip('running as root without chattr +i: cannot make a read-only folder')
  else:
    workdir.chmod(0o555)
  try:
    reason = faults.check_writable(str(workdir))
  finally:
    if os.geteuid() == 0:
      subprocess.run(['chattr', '-i', str(workdir)])
    workdir.chmod(0o755)
  assert reason.startswith(f'cannot write to --workdir {workdir} (')
  assert 'pass a writable folder' in reason


def test_cli_workdir_that_is_a_file_exits_2_in_one_line(tmp_path):
  afile = tmp_path / 'afile'
  afile.write_text('keep me')
  result = subprocess.run(
      [sys.executable, '-m', 'jaxmodel.train', '--config=cifar', f'--workdir={afile}'],
      capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 2
  assert result.stderr.strip() == f'error: --workdir {afile} is a file; pass a folder'
  assert afile.read_text() == 'keep me'
