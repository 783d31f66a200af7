"""The executable cache: a hit skips tracing and runs the same program; anything else compiles."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmodel import compile_cache, create_train_state, get_model, parallel


def _state_and_batch():
  model = get_model('mlp', hidden=(32,))
  state = create_train_state(model, optax.sgd(0.05, 0.9), jnp.zeros((2, 8, 8, 3)),
                             jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
           'label': rng.integers(0, 10, 8).astype(np.int32)}
  return state, batch


def _compile(state, batch, compiler):
  mesh = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  state = parallel.put(state, parallel.state_shardings(state, mesh))
  train_fn, _ = parallel.compile_steps('jit', mesh, state, batch, compiler=compiler)
  return train_fn, state


def _never_traced(*args):
  raise AssertionError('traced although the executable was cached')


def test_a_hit_loads_without_tracing_and_trains_exactly_the_same(tmp_path):
  state, batch = _state_and_batch()
  compiler = compile_cache.Compiler(['mlp', 8], jax.devices()[:1], str(tmp_path))
  train_fn, state = _compile(state, batch, compiler)
  assert compiler.loaded == [] and len(os.listdir(tmp_path)) == 1
  expected = train_fn(jax.tree.map(jnp.copy, state), batch)  # the step donates its state

  again = compile_cache.Compiler(['mlp', 8], jax.devices()[:1], str(tmp_path))
  loaded_fn, _ = _compile(state, batch, again)
  assert again.loaded == ['jit step']
  chex.assert_trees_all_equal(loaded_fn(jax.tree.map(jnp.copy, state), batch), expected)
  assert loaded_fn.cost_analysis()['flops'] == train_fn.cost_analysis()['flops']

  # What the cache would return for this jit without calling its function at all:
  mesh = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  shardings = parallel.state_shardings(state, mesh)
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state, shardings)
  batch_sharding = parallel.batch_sharding(mesh)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
            for k, v in batch.items()}
  compiled, hit = compile_cache.load_or_compile(
      jax.jit(_never_traced), (abstract_state, shapes), ['mlp', 8, 'jit step'],
      jax.devices()[:1], str(tmp_path))
  assert hit
  chex.assert_trees_all_equal(compiled(jax.tree.map(jnp.copy, state), batch), expected)


def test_another_description_shape_or_corrupt_file_compiles_afresh(tmp_path, capsys):
  state, batch = _state_and_batch()
  _compile(state, batch, compile_cache.Compiler(['mlp', 8], jax.devices()[:1], str(tmp_path)))
  other = compile_cache.Compiler(['mlp', 9], jax.devices()[:1], str(tmp_path))
  _compile(state, batch, other)
  assert other.loaded == [] and len(os.listdir(tmp_path)) == 2

  bigger = {k: np.concatenate([v, v]) for k, v in batch.items()}
  wider = compile_cache.Compiler(['mlp', 8], jax.devices()[:1], str(tmp_path))
  _compile(state, bigger, wider)
  assert wider.loaded == [] and len(os.listdir(tmp_path)) == 3

  for name in os.listdir(tmp_path):  # e.g. a disk that filled up mid-write long ago
    with open(tmp_path / name, 'r+b') as f:
      f.truncate(100)
  damaged = compile_cache.Compiler(['mlp', 8], jax.devices()[:1], str(tmp_path))
  train_fn, state = _compile(state, batch, damaged)
  assert damaged.loaded == [] and 'did not load' in capsys.readouterr().out
  new_state, metrics = train_fn(state, batch)
  assert int(new_state.step) == 1 and np.isfinite(metrics['loss'])
  repaired = compile_cache.Compiler(['mlp', 8], jax.devices()[:1], str(tmp_path))
  _compile(*_state_and_batch(), repaired)
  assert repaired.loaded == ['jit step']


def test_a_cache_that_cannot_be_written_does_not_stop_training(tmp_path, capsys):
  state, batch = _state_and_batch()
  (tmp_path / 'executables').write_text('a file where the cache dir should be')
  compiler = compile_cache.Compiler(['mlp', 8], jax.devices()[:1], str(tmp_path / 'executables'))
  train_fn, state = _compile(state, batch, compiler)
  assert 'not caching the executable' in capsys.readouterr().out
  new_state, metrics = train_fn(state, batch)
  assert int(new_state.step) == 1 and np.isfinite(metrics['loss'])


def test_the_key_covers_jaxmodels_source_and_xla_flags(monkeypatch):
  args = (jax.ShapeDtypeStruct((4, 3), jnp.float32),)
  key = compile_cache.program_key(['x'], args, jax.devices()[:1])
  assert compile_cache.program_key(['x'], args, jax.devices()[:1]) == key
  flags = os.environ.get('XLA_FLAGS', '')
  monkeypatch.setenv('XLA_FLAGS', flags + ' --xla_cpu_use_thunk_runtime=false')
  assert compile_cache.program_key(['x'], args, jax.devices()[:1]) != key
  monkeypatch.setenv('XLA_FLAGS', flags)
  assert compile_cache.program_key(['x'], args, jax.devices()[:1]) == key
  monkeypatch.setenv('PJRT_NPROC', str(compile_cache.cpu_threads() + 1))
  assert compile_cache.program_key(['x'], args, jax.devices()[:1]) != key
  monkeypatch.delenv('PJRT_NPROC')
  monkeypatch.setattr(compile_cache, '_source_digest', lambda: 'edited')
  assert compile_cache.program_key(['x'], args, jax.devices()[:1]) != key


_SPLIT = '''
import re, jax, jax.numpy as jnp
from jaxmodel import compile_cache
compile_cache.enable_xla_cache()
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
x = jnp.ones((400, 120))
text = jax.jit(lambda a, b: a * 0.9 + b).lower(x, x).compile().as_text()
print(len(re.findall(r'outer_dimension_partitions":\\["[2-9]', text)))
'''


def test_jaxs_cache_never_serves_a_program_split_for_another_thread_count(tmp_path):
  def split_loops(threads):
    result = subprocess.run(
        [sys.executable, '-c', _SPLIT], capture_output=True, text=True, timeout=300,
        env={**os.environ, 'XDG_CACHE_HOME': str(tmp_path), 'JAX_PLATFORMS': 'cpu',
             'PJRT_NPROC': str(threads)})
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout)

  assert split_loops(2) == 1  # XLA splits the loop for 2 threads, and JAX's cache keeps it
  assert split_loops(1) == 0  # the same program for 1 thread: compiled for 1, not loaded
  assert split_loops(2) == 1


_RUN = '''
import sys, jax
from jaxmodel import compile_cache
import test_compile_cache as t
compile_cache.enable_xla_cache()
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
compiler = compile_cache.Compiler([sys.argv[1]], jax.devices()[:1])
state, batch = t._state_and_batch()
train_fn, state = t._compile(state, batch, compiler)
state, metrics = train_fn(state, batch)
print(compiler.loaded, float(metrics['loss']))
'''


def test_an_executable_jaxs_own_cache_served_is_compiled_afresh_to_save_it(tmp_path):
  # A copy of what JAX's persistent cache loaded fails at run time once saved and loaded again.
  def run(description):
    result = subprocess.run(
        [sys.executable, '-c', _RUN, description], capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(__file__),
        env={**os.environ, 'XDG_CACHE_HOME': str(tmp_path), 'JAX_PLATFORMS': 'cpu'})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()

  first = run('first')  # compiled; now in both caches
  assert first[0] == '[]'
  assert run('second')[0] == '[]'  # another key, the same program: JAX's cache has it
  loaded = run('second')
  assert loaded == ["['jit", "step']", first[-1]]


_MESH_RUN = '''
import sys, jax, numpy as np
from jaxmodel import compile_cache, parallel
import test_compile_cache as t
devices = jax.devices()
mesh = parallel.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1},
                          [devices[i] for i in (3, 1, 0, 2, 7, 5, 4, 6)])
state, batch = t._state_and_batch()
batch = {k: np.concatenate([v, v[::-1]]) for k, v in batch.items()}  # 16 rows: 2 per device
state = parallel.put(state, parallel.state_shardings(state, mesh))
compiler = compile_cache.Compiler(['mesh'], mesh.devices.flat, sys.argv[1])
train_fn, _ = parallel.compile_steps('jit', mesh, state, batch, compiler=compiler)
state, _ = train_fn(state, batch)
state, _ = train_fn(state, batch)
kernel = state.params['Dense_0']['kernel']
print(compiler.loaded, kernel.sharding.spec, float(np.abs(np.asarray(kernel)).sum()))
'''


def test_a_loaded_executable_keeps_the_meshs_device_order(tmp_path):
  def run():
    result = subprocess.run(
        [sys.executable, '-c', _MESH_RUN, str(tmp_path)], capture_output=True, text=True,
        timeout=300, cwd=os.path.dirname(__file__),
        env={**os.environ, 'JAX_PLATFORMS': 'cpu',
             'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()

  compiled, loaded = run(), run()
  assert compiled.startswith('[]') and loaded.startswith("['jit step']")
  assert compiled.split(']', 1)[1] == loaded.split(']', 1)[1]  # same sharding, same kernel
