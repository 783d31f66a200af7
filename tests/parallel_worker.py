"""Runs in its own process for test_parallel.py: JAX must see its fake devices before it starts.

  python parallel_worker.py single OUT            1 process, 8 devices: every strategy, K steps
  python parallel_worker.py two OUT PORT ID       process ID of 2 (4 devices each), 127.0.0.1:PORT
  python parallel_worker.py resume OUT            1 process, 1 device: resumes the 2-process checkpoint
  python parallel_worker.py threads OUT N         1 process, 1 device, XLA:CPU on N threads

Every run trains the same small ResNet (BatchNorm, SGD with momentum) from the same init on the
same global batches and writes its final params and BatchNorm statistics to OUT/NAME.npz.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from jaxmodel import checkpoint, models, parallel
from jaxmodel.steps import create_train_state

K, BATCH, IMAGE = 3, 16, (8, 8, 3)


def batches(start, stop):
  rng = np.random.default_rng(0)
  all_batches = [{'image': rng.normal(size=(BATCH, *IMAGE)).astype(np.float32),
                  'label': rng.integers(0, 10, BATCH).astype(np.int32)} for _ in range(2 * K)]
  return all_batches[start:stop]


def mesh_of(data, fsdp, tensor, devices=None):
  return parallel.make_mesh(ml_collections.ConfigDict({'data': data, 'fsdp': fsdp, 'tensor': tensor}),
                            devices)


MODEL = models.get_model('resnet', num_classes=10, stage_sizes=(1,), width=8)
TX = optax.sgd(0.1, momentum=0.9)  # one object: a compiled step is specific to the state's tx


def new_state(mesh, strategy='jit'):
  model = parallel.prepare_model(MODEL, strategy)
  return parallel.create_state(
      lambda: create_train_state(model, TX, jnp.zeros((2, *IMAGE)), jax.random.PRNGKey(0)), mesh)


_compiled = {}  # (strategy, mesh) -> train step: compiling dominates these runs


def train(state, mesh, strategy, global_batches):
  """Trains on this process's rows of each global batch (process i holds the i-th block)."""
  n, i = jax.process_count(), jax.process_index()
  local = [{k: v[i * BATCH // n:(i + 1) * BATCH // n] for k, v in b.items()} for b in global_batches]
  if (strategy, mesh) not in _compiled:
    _compiled[strategy, mesh] = parallel.compile_steps(strategy, mesh, state, local[0])[0]
  train_fn = _compiled[strategy, mesh]
  for batch in local:
    state, _ = train_fn(state, batch)
  return state


def save_arrays(out, name, state):
  """Writes params and batch_stats (gathered from every process) as OUT/NAME.npz on process 0."""
  tree = {'params': state.params, **state.model_state}
  if jax.process_count() > 1:  # (one process holds every shard: no gather to compile)
    tree = multihost_utils.process_allgather(tree, tiled=True)
  flat = {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  if jax.process_index() == 0:
    np.savez(os.path.join(out, f'{name}.npz'), **flat)


def save_checkpoint(directory, state):
  manager = checkpoint.make_manager(directory)
  checkpoint.save(manager, state)
  manager.wait_until_finished()


def restore_checkpoint(directory, mesh):
  return checkpoint.restore(checkpoint.make_manager(directory), new_state(mesh))


def single(out):
  first, second = batches(0, K), batches(K, 2 * K)
  one_device = mesh_of(1, 1, 1, jax.devices()[:1])
  reference = train(new_state(one_device), one_device, 'jit', first)
  save_arrays(out, 'reference_K', reference)
  save_arrays(out, 'reference_2K', train(reference, one_device, 'jit', second))
  layouts = {}
  for name, strategy, sizes in [('jit_data', 'jit', (8, 1, 1)), ('jit_fsdp', 'jit', (1, 8, 1)),
                                ('jit_data_tensor', 'jit', (4, 1, 2)),
                                ('shard_map', 'shard_map', (-1, 1, 1))]:
    mesh = mesh_of(*sizes)
    state = train(new_state(mesh, strategy), mesh, strategy, first)
    save_arrays(out, name, state)
    kernel = state.params['ResidualBlock_0']['Conv_0']['kernel']
    layouts[name] = {'spec': str(kernel.sharding.spec),
                     'shard_shape': list(kernel.addressable_shards[0].data.shape)}
    if name == 'jit_fsdp':
      save_checkpoint(os.path.join(out, 'one_process'), state)
  # 8 devices (FSDP) -> 1 device, and on.
  restored = restore_checkpoint(os.path.join(out, 'one_process'), one_device)
  layouts['restored_on_one_device'] = {'step': int(restored.step)}
  save_arrays(out, 'eight_to_one_device', train(restored, one_device, 'jit', second))
  with open(os.path.join(out, 'layouts.json'), 'w') as f:
    json.dump(layouts, f)


def two(out, port, process_id):
  assert parallel.initialize_distributed(ml_collections.ConfigDict({
      'initialize': 'auto', 'coordinator_address': f'127.0.0.1:{port}', 'num_processes': 2,
      'process_id': process_id}))
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  mesh = mesh_of(2, 4, 1)  # batch over both processes; params sharded across them (fsdp 4)
  state = train(new_state(mesh), mesh, 'jit', batches(0, K))
  save_arrays(out, 'two_processes', state)
  save_checkpoint(os.path.join(out, 'two_process'), state)  # every process writes its shards
  # The 1-process (8-device FSDP) checkpoint, resumed by 2 processes.
  restored = restore_checkpoint(os.path.join(out, 'one_process'), mesh)
  save_arrays(out, 'one_to_two_processes', train(restored, mesh, 'jit', batches(K, 2 * K)))


def resume(out):
  one_device = mesh_of(1, 1, 1)
  restored = restore_checkpoint(os.path.join(out, 'two_process'), one_device)
  save_arrays(out, 'two_processes_to_one_device',
              train(restored, one_device, 'jit', batches(K, 2 * K)))


def threads(out, count):
  assert parallel.set_cpu_threads(count)  # before JAX starts
  one_device = mesh_of(1, 1, 1)
  save_arrays(out, f'threads_{count}', train(new_state(one_device), one_device, 'jit',
                                             batches(0, K)))


if __name__ == '__main__':
  mode, out, *rest = sys.argv[1:]
  {'single': single, 'two': two, 'resume': resume, 'threads': threads}[mode](out, *map(int, rest))
