"""Compiled programs kept across runs, so that a second run starts without tracing or compiling.

Two layers, both in the user's cache dir ($XDG_CACHE_HOME/jaxmodel, else ~/.cache/jaxmodel):
  xla-cpuN/     JAX's persistent compilation cache. It skips XLA's compile, but Python still
                traces and lowers the step (about 1 s for the cifar step on a CPU). JAX's key
                leaves out the size N of XLA:CPU's thread pool, for which the program's loops
                are split: a directory per size keeps a program split for two threads from
                being run on one.
  executables/  the train step's executable itself (jax.experimental.serialize_executable), under
                a key made of what the traced program depends on: jaxmodel's source files, the
                caller's description (config, dataset size, ...), the arguments' shapes, dtypes
                and shardings, the devices, the library versions, JAX's flags, XLA_FLAGS and
                the thread pool's size.
                A hit skips tracing too.
Code outside jaxmodel that changes without a version change (a monkeypatch, an edited file in
site-packages) is not in the key: run such experiments with config.compilation_cache=False, or
delete the directory. Several processes (jax.distributed) always compile.
"""

import contextlib
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import pickle
import sys
from typing import Any, Sequence

import jax
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'ml-collections')
_KEEP_EXECUTABLES = 64  # the newest; older ones are removed when a new one is written


def cache_dir() -> str:
  cache_home = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
  return os.path.join(cache_home, 'jaxmodel')


def cpu_cores() -> int:
  """The CPUs this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def cpu_threads() -> int:
  """The size of XLA:CPU's thread pool in this process: PJRT_NPROC, else one per core."""
  nproc = os.environ.get('PJRT_NPROC', '')
  if nproc.isdigit() and int(nproc) > 0:
    return int(nproc)
  return cpu_cores()


def enable_xla_cache() -> str:
  """Turns on JAX's persistent compilation cache in the user's cache dir; returns the dir.

  Call it after parallel.set_cpu_threads: the directory depends on the thread pool's size.
  """
  path = os.path.join(cache_dir(), f'xla-cpu{cpu_threads()}')
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  return path


@functools.cache
def _source_digest() -> str:
  """A digest of jaxmodel's own source: editing any module invalidates every executable."""
  digest = hashlib.sha256()
  for path in sorted([*pathlib.Path(__file__).parent.glob('*.py'),
                      *pathlib.Path(__file__).parent.glob('*.cc')]):
    digest.update(path.name.encode() + b'\0' + path.read_bytes())
  return digest.hexdigest()


def _environment() -> list:
  versions = []
  for package in _PACKAGES:
    try:
      versions.append((package, importlib.metadata.version(package)))
    except importlib.metadata.PackageNotFoundError:
      versions.append((package, None))
  flags = sorted((k, repr(v)) for k, v in jax.config.values.items()
                 if k != 'jax_compilation_cache_dir')
  env = sorted((k, v) for k, v in os.environ.items()
               if v and (k == 'XLA_FLAGS' or k.startswith('JAXMODEL_')))
  from jaxmodel import onednn  # whether the convolutions are oneDNN's changes the program
  return [sys.version, versions, flags, env, _source_digest(), onednn.available(), cpu_threads()]


def _describe(tree: Any) -> list:
  """Shapes, dtypes, shardings and weak types of an argument tree (the tree's paths included)."""
  return [(jax.tree_util.keystr(path), tuple(leaf.shape), str(leaf.dtype),
           repr(getattr(leaf, 'sharding', None)), bool(getattr(leaf, 'weak_type', False)))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def program_key(description: Sequence[Any], args: Sequence[Any], devices: Sequence[Any]) -> str:
  """The cache key of the program jit-compiled for `args` and described by `description`."""
  devices = [(d.id, d.platform, d.device_kind, d.process_index) for d in devices]
  parts = [list(map(repr, description)), _describe(list(args)), devices, _environment()]
  return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def compile_plain(jitted: Any, args: Sequence[Any], name: str) -> jax.stages.Compiled:
  return jitted.lower(*args).compile()


class Compiler:
  """Compiles jitted steps through the executable cache; `loaded` names the ones it loaded."""

  def __init__(self, description: Sequence[Any], devices: Sequence[Any],
               directory: str | None = None):
    self.description, self.devices, self.directory = list(description), list(devices), directory
    self.loaded = []

  def __call__(self, jitted: Any, args: Sequence[Any], name: str) -> jax.stages.Compiled:
    compiled, hit = load_or_compile(jitted, args, self.description + [name], self.devices,
                                    self.directory)
    if hit:
      self.loaded.append(name)
    return compiled


def load_or_compile(jitted: Any, args: Sequence[Any], description: Sequence[Any],
                    devices: Sequence[Any], directory: str | None = None
                    ) -> tuple[jax.stages.Compiled, bool]:
  """`jitted.lower(*args).compile()`, or the same executable saved by an earlier run.

  `args[0]` must be the step's state, returned first with the same structure (the state's
  structure holds functions, which cannot be saved; it is rebuilt from the caller's state).
  Returns (compiled, whether it came from the cache). Several processes always compile.
  """
  if jax.process_count() > 1:
    return jitted.lower(*args).compile(), False
  directory = directory or os.path.join(cache_dir(), 'executables')
  path = os.path.join(directory, program_key(description, args, devices) + '.pkl')
  in_tree = jax.tree.structure((tuple(args), {}))
  state_tree = jax.tree.structure(args[0])
  if os.path.exists(path):
    try:
      with open(path, 'rb') as f:
        payload, metrics_template = pickle.load(f)
      out_tree = jax.tree_util.treedef_tuple([state_tree, jax.tree.structure(metrics_template)])
      return serialize_executable.deserialize_and_load(
          payload, in_tree, out_tree, execution_devices=list(devices)), True
    except Exception as error:  # a file from a crashed write or an incompatible build: recompile
      print(f'recompiling: the cached executable {path} did not load ({type(error).__name__})',
            flush=True)
  with _xla_cache_off():
    compiled = jitted.lower(*args).compile()
  _save(compiled, in_tree, state_tree, path)
  return compiled, False


@contextlib.contextmanager
def _xla_cache_off():
  """JAX's persistent cache bypassed: an executable it loaded saves without its kernels.

  (Seen with jax 0.10.2 on CPU: such a copy loads, then fails at run time with "Function
  transpose_copy_fusion not found". A fresh compile saves whole.)
  """
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  compilation_cache.reset_cache()  # it remembers whether it is on
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', enabled)
    compilation_cache.reset_cache()


def _save(compiled: jax.stages.Compiled, in_tree: Any, state_tree: Any, path: str) -> None:
  """Writes `compiled` atomically (a crashed write leaves no file to load); skips what cannot go."""
  out_children = compiled.out_tree.children()
  if len(out_children) != 2 or out_children[0] != state_tree or compiled.in_tree != in_tree:
    return  # not the (state, metrics) shape the loader rebuilds
  try:
    payload, _, _ = serialize_executable.serialize(compiled)
    metrics_template = jax.tree.unflatten(out_children[1], [0] * out_children[1].num_leaves)
    data = pickle.dumps((payload, metrics_template))  # PyTreeDefs do not unpickle usably
  except (ValueError, NotImplementedError, TypeError, pickle.PicklingError):
    return  # e.g. an executable with closed-over constants
  temporary = f'{path}.{os.getpid()}.tmp'
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(temporary, 'wb') as f:
      f.write(data)
    os.replace(temporary, path)
  except OSError as error:  # a cache is optional: training goes on, the next run compiles again
    with contextlib.suppress(OSError):
      os.remove(temporary)
    print(f'not caching the executable in {os.path.dirname(path)}: {error}', flush=True)
    return
  saved = sorted(pathlib.Path(path).parent.glob('*.pkl'), key=lambda p: p.stat().st_mtime)
  for old in saved[:-_KEEP_EXECUTABLES]:
    old.unlink(missing_ok=True)
