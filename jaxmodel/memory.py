"""Transparent huge pages for XLA:CPU's per-step buffers (Linux with glibc).

XLA:CPU allocates the temporary buffer of every call afresh and frees it afterwards: 227 MB for
airbench94's train step at batch 128. glibc serves an allocation above 32 MB with a fresh mmap
and returns it with munmap, so every step faults the whole buffer back in, 4 KiB at a time:
55,400 page faults and ~185 ms of system time per step on the 2-core CI machine. With glibc's
`glibc.malloc.hugetlb=1` tunable, malloc asks the kernel for transparent huge pages (2 MiB) for
such memory: ~440 faults and ~50 ms (experiments/README.md).

glibc reads its tunables once, when the process starts, so `use_huge_pages()` restarts the
process (os.execve: same PID, arguments and open files) with the tunable added to
GLIBC_TUNABLES. The command-line programs call it before anything else, and the package imports
JAX lazily, so the restart costs a second interpreter start: about 0.05 s. JAXMODEL_HUGE_PAGES=0
turns it off. It does nothing where it cannot help: not Linux with glibc 2.35 or newer, or the
kernel's transparent huge pages set to 'never'.
"""

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'


def _supported() -> bool:
  if sys.platform != 'linux':
    return False
  libc, version = platform.libc_ver()
  if libc != 'glibc' or tuple(int(part) for part in version.split('.')[:2]) < (2, 35):
    return False  # the hugetlb tunable came in glibc 2.35
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return '[never]' not in f.read()
  except OSError:
    return False


def huge_pages_environment(environ) -> dict | None:
  """`environ` with the tunable added; None if it is set already, turned off or of no use here."""
  if environ.get('JAXMODEL_HUGE_PAGES') == '0':
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in tunables:
    return None  # set already: by the restart, or by the user
  if not _supported():
    return None
  return {**environ, 'GLIBC_TUNABLES': ':'.join(filter(None, [tunables, TUNABLE]))}


def use_huge_pages() -> None:
  """Restarts this process with huge pages for malloc, unless it has them or they cannot help."""
  environment = huge_pages_environment(os.environ)
  if environment is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
  except OSError:
    pass  # e.g. no executable to restart: go on without huge pages
