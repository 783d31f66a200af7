"""The command-line programs restart themselves once with huge pages for malloc (jaxmodel.memory)."""

import os
import subprocess
import sys

import pytest

from jaxmodel import memory


@pytest.fixture
def supported(monkeypatch):
  monkeypatch.setattr(memory, '_supported', lambda: True)


def test_the_tunable_joins_the_users_tunables(supported):
  assert memory.huge_pages_environment({'A': '1'}) == {'A': '1', 'GLIBC_TUNABLES': memory.TUNABLE}
  assert memory.huge_pages_environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}) == {
      'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:' + memory.TUNABLE}


def test_no_restart_when_set_turned_off_or_unsupported(supported, monkeypatch):
  assert memory.huge_pages_environment({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}) is None
  assert memory.huge_pages_environment({'GLIBC_TUNABLES': memory.TUNABLE}) is None
  assert memory.huge_pages_environment({'JAXMODEL_HUGE_PAGES': '0'}) is None
  monkeypatch.setattr(memory, '_supported', lambda: False)
  assert memory.huge_pages_environment({}) is None


# A program that restarts itself, then counts the page faults of writing 256 MiB from malloc
# (not numpy's: numpy asks for huge pages itself).
_PROGRAM = '''
import os, resource, sys
print('started', flush=True)
from jaxmodel import memory
memory.use_huge_pages()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
bytearray(2**28)  # 256 MiB of zeros from malloc, mapped fresh as XLA's per-step buffers are
print(os.environ.get('GLIBC_TUNABLES'), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


@pytest.mark.skipif(not memory._supported(), reason='no glibc hugetlb tunable or THP here')
def test_a_program_restarts_once_with_huge_pages():
  run = lambda **env: subprocess.run([sys.executable, '-c', _PROGRAM], capture_output=True,
                                     text=True, env={**os.environ, **env}, check=True).stdout
  lines = run(JAXMODEL_HUGE_PAGES='1').split('\n')
  assert lines[:2] == ['started', 'started']  # one restart, with the same arguments
  tunables, faults = lines[2].split()
  assert tunables.split(':').count(memory.TUNABLE) == 1
  plain_tunables, plain_faults = run(JAXMODEL_HUGE_PAGES='0').split('\n')[1].split()
  assert plain_tunables == os.environ.get('GLIBC_TUNABLES', 'None')
  # 4 KiB pages: 65,536 faults. Huge pages: 2 MiB each, where the kernel has them free.
  assert int(plain_faults) >= 60_000
  assert int(faults) < int(plain_faults) // 4


# Run at every interpreter start (sitecustomize), the restart's included: which tunables it has.
_REPORT_START = '''
import os, sys
print('interpreter start, tunables:', os.environ.get('GLIBC_TUNABLES', ''), file=sys.stderr,
      flush=True)
'''


@pytest.mark.skipif(not memory._supported(), reason='no glibc hugetlb tunable or THP here')
@pytest.mark.parametrize('command', [
    ['jaxmodel.train', '--config=cifar', '--config.optimizer.nam=adam'],
    ['jaxmodel.evaluate', '--workdir', 'no-such-run'],
])
def test_the_command_line_programs_restart_once_with_huge_pages(command, tmp_path):
  (tmp_path / 'sitecustomize.py').write_text(_REPORT_START)
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'JAXMODEL_HUGE_PAGES')}
  env.update(JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), env.get('PYTHONPATH')])))
  result = subprocess.run([sys.executable, '-m', *command], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr  # both command lines are bad on purpose
  starts = [line for line in result.stderr.splitlines() if line.startswith('interpreter start')]
  assert starts == ['interpreter start, tunables: ',
                    f'interpreter start, tunables: {memory.TUNABLE}']
