"""Scale-out: the same train step on one device, many devices and many processes, set by config.

A run sees a device mesh with axes ('data', 'fsdp', 'tensor') (config.parallel.mesh; -1 fills the
rest). The global batch splits over data x fsdp. Parameters, optimizer state and BatchNorm
statistics get a PartitionSpec from logical axis names and rules, in the style of Flax's logical
partitioning: a kernel's input features shard over 'fsdp' and its output features over 'tensor'
(an axis that does not divide evenly stays whole).

Two strategies compile the same `steps.train_step`:
  'jit'        jax.jit with NamedSharding in/out shardings and donated state; XLA's partitioner
               inserts the collectives (data parallel, FSDP, tensor parallel, or a mix).
  'shard_map'  the pmap style: a per-device step on its slice of the batch with explicit
               `lax.pmean` of gradients and BatchNorm statistics; params replicated (data only).

Several processes (hosts) run the same program after `initialize_distributed`; each reads only its
share of the data and `global_batch` assembles the global array from the process-local pieces.
"""

import functools
import math
import os
import re
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from jax._src import xla_bridge  # backends_are_initialized: as jax.distributed.initialize checks
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxmodel import compile_cache, onednn
from jaxmodel.steps import eval_step, train_step

MESH_AXES = ('data', 'fsdp', 'tensor')
STRATEGIES = ('jit', 'shard_map')

# Logical names of each kind of array's axes, found by the array's name and rank.
LOGICAL_AXES = {
    ('kernel', 4): ('height', 'width', 'in_features', 'out_features'),  # conv, HWIO
    ('kernel', 2): ('in_features', 'out_features'),  # dense
    ('bias', 1): ('out_features',),
    ('scale', 1): ('out_features',),  # BatchNorm/LayerNorm
    ('mean', 1): ('out_features',),  # BatchNorm statistics
    ('var', 1): ('out_features',),
}
# Logical axis -> mesh axes (flax.linen.logical_to_mesh_axes rules); unnamed axes stay whole.
RULES = (
    ('batch', ('data', 'fsdp')),
    ('in_features', 'fsdp'),
    ('out_features', 'tensor'),
)


class ParallelError(ValueError):
  """A mesh, strategy or batch size that cannot run here; its message is one line."""


def initialize_distributed(config: Any) -> bool:
  """Joins the multi-process runtime when the config or the environment asks; True if joined.

  `config` is config.distributed. With initialize='auto', a coordinator address (config or
  $JAX_COORDINATOR_ADDRESS) or a SLURM job of several tasks starts it; 'always' also covers TPU
  pod slices and other clusters JAX detects; 'never' keeps one process.
  """
  if config.initialize not in ('auto', 'always', 'never'):
    raise ParallelError(f"distributed.initialize is {config.initialize!r}; choose 'auto', "
                        f"'always' or 'never'")
  if jax.distributed.is_initialized() or config.initialize == 'never':
    return jax.distributed.is_initialized()
  explicit = config.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ
  if config.initialize == 'auto' and not (explicit or slurm):
    return False
  # None lets JAX read the rest from its environment variables or the cluster (SLURM, TPU, ...).
  jax.distributed.initialize(coordinator_address=config.coordinator_address,
                             num_processes=config.num_processes, process_id=config.process_id)
  return True


def local_cpu_devices() -> int:
  """How many CPU devices JAX makes in this process: 1, or the fake ones asked for to test
  sharding (jax_num_cpu_devices, or --xla_force_host_platform_device_count in XLA_FLAGS)."""
  configured = jax.config.jax_num_cpu_devices
  if configured and configured > 0:
    return configured
  flags = os.environ.get('XLA_FLAGS', '')
  match = re.search(r'--xla_force_host_platform_device_count=(\d+)', flags)
  return int(match.group(1)) if match else 1


def set_cpu_threads(threads: int) -> bool:
  """Sizes XLA:CPU's thread pool for a step's operations (0: one per core); True if it applies.

  With several CPU devices in one process the pool gets at least two threads per device: XLA:CPU
  runs every device's collectives on it, and with fewer a device's all-gather could wait on a
  device whose work sat queued behind it, until XLA aborted the process after 40 s (the tutorial
  CNN's 'jit' step on 2 devices and 2 threads: 2 runs in 3; experiments/README.md).
  JAX reads the size (PJRT_NPROC) when it starts its CPU backend, so this must come before
  anything touches the devices; afterwards it only warns. A PJRT_NPROC set by the user stands
  when `threads` is 0.
  """
  devices = local_cpu_devices()
  if devices > 1 and 'PJRT_NPROC' not in os.environ and not xla_bridge.backends_are_initialized():
    threads = max(threads or compile_cache.cpu_cores(), 2 * devices)
  if threads == 0 or os.environ.get('PJRT_NPROC') == str(threads):
    return True
  if xla_bridge.backends_are_initialized():
    print(f'warning: parallel.cpu_threads={threads} not applied: JAX had started its backends; '
          f'set PJRT_NPROC={threads} in the environment instead', file=sys.stderr, flush=True)
    return False
  os.environ['PJRT_NPROC'] = str(threads)
  return True


def make_mesh(mesh_config: Any, devices: list | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all); one -1 takes the rest."""
  devices = jax.devices() if devices is None else devices
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  shape_text = ' x '.join(f'{a}={s}' for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ParallelError(f'parallel.mesh {shape_text}: give positive sizes and at most one -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ParallelError(f'parallel.mesh {shape_text} cannot fill {len(devices)} devices; '
                          f'make the fixed sizes divide {len(devices)}')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ParallelError(f'parallel.mesh {shape_text} needs {math.prod(sizes)} devices but '
                        f'{len(devices)} are here; make the product {len(devices)} or use -1')
  # jax.devices() lists each process's devices together, so the tensor axis (innermost) and the
  # batch slices stay within a process as long as the sizes allow.
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def _leaf_name(path) -> str:
  key = path[-1] if path else None
  return str(getattr(key, 'key', getattr(key, 'name', '')))


def partition_spec(path, shape: tuple, mesh: Mesh) -> P:
  """The PartitionSpec of the array at `path` (its last key names it) under RULES."""
  logical = LOGICAL_AXES.get((_leaf_name(path), len(shape)))
  if logical is None:
    return P()
  spec = []
  for size, axes in zip(shape, nn.logical_to_mesh_axes(logical, RULES)):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    # An axis that does not split evenly stays whole (e.g. a conv's 3 input channels).
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
      spec.append(None)
    else:
      spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """A NamedSharding for every array of `state` (arrays or ShapeDtypeStructs), by rule."""
  return jax.tree.map_with_path(
      lambda path, leaf: NamedSharding(mesh, partition_spec(path, leaf.shape, mesh)), state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The global batch's leading axis splits over data x fsdp; the rest is whole."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(('batch',), RULES))


def batch_shards(mesh: Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'batch_size') -> None:
  """Refuses a global batch that does not split evenly across processes and batch shards."""
  processes, shards = jax.process_count(), batch_shards(mesh)
  if batch_size % processes or batch_size % shards:
    multiple = math.lcm(processes, shards)
    raise ParallelError(f'{what} {batch_size} does not divide across {processes} processes and '
                        f'{shards} batch shards (data {mesh.shape["data"]} x fsdp '
                        f'{mesh.shape["fsdp"]}); use a multiple of {multiple}')
  if shards % processes:
    raise ParallelError(f'data x fsdp = {shards} batch shards do not split across {processes} '
                        f'processes; make data x fsdp a multiple of {processes}')


def check_strategy(strategy: str, mesh: Mesh) -> None:
  """Refuses an unknown strategy, or a mesh the strategy (or platform) cannot run."""
  if strategy not in STRATEGIES:
    raise ParallelError(f'unknown parallel.strategy {strategy!r}; choose one of {STRATEGIES}')
  if strategy == 'shard_map' and (mesh.shape['fsdp'] > 1 or mesh.shape['tensor'] > 1):
    raise ParallelError(f'strategy shard_map is data parallel only, but parallel.mesh has fsdp '
                        f'{mesh.shape["fsdp"]} and tensor {mesh.shape["tensor"]}; set them to 1 '
                        f'or use --config.parallel.strategy=jit')
  check_mesh(mesh)


def check_mesh(mesh: Mesh) -> None:
  """Refuses a mesh known to compute wrong results on this platform."""
  # Seen with jax 0.10.2 on XLA:CPU (Shardy and GSPMD alike): a batch split over data x fsdp with
  # kernels split over tensor, all three > 1, gave gradients off by ~5e-2 after one step.
  if jax.default_backend() == 'cpu' and min(mesh.shape.values()) > 1:
    raise ParallelError('parallel.mesh with data, fsdp and tensor all > 1 computes wrong gradients '
                        'on CPU; set one of them to 1')


def prepare_model(model: nn.Module, strategy: str) -> nn.Module:
  """`model` with BatchNorm averaging over the 'data' axis under shard_map (if it has BatchNorm)."""
  if strategy == 'shard_map' and 'norm_axis_name' in getattr(model, '__dataclass_fields__', {}):
    return model.clone(norm_axis_name='data')
  return model


def create_state(create: Callable[[], Any], mesh: Mesh) -> Any:
  """Calls `create()` (e.g. create_train_state) jitted so the state is born sharded.

  Under FSDP no device ever holds all the parameters, not even at initialization.
  """
  shardings = state_shardings(jax.eval_shape(create), mesh)
  return jax.jit(create, out_shardings=shardings)()


def put(tree: Any, shardings: Any) -> Any:
  """`tree` with each array laid out as `shardings` says (a no-op where it already is).

  Arrays another way (e.g. a host-computed init) go through the host, which every process holds
  in full; device_put of a process-local array would not build a multi-process array.
  """
  def place(leaf, sharding):
    if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
      return leaf
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # already global
      return jax.device_put(leaf, sharding)
    value = np.asarray(leaf)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree.map(place, tree, shardings)


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """The global batch from each process's rows (its contiguous share, in process order)."""
  return {k: jax.make_array_from_process_local_data(
      sharding, np.asarray(v), (v.shape[0] * jax.process_count(), *v.shape[1:]))
          for k, v in local_batch.items()}


def _pad_rows(batch: dict, multiple: int) -> dict:
  """Pads a masked eval batch with masked-out rows up to a multiple of `multiple`."""
  pad = -len(batch['mask']) % multiple
  if not pad:
    return batch
  batch = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in batch.items()}
  batch['mask'][-pad:] = False
  return batch


class Step:
  """A compiled step called with this process's (numpy) batch: it assembles the global batch."""

  def __init__(self, fn, sharding: NamedSharding, pad_to: int = 1):
    self.fn, self.sharding, self.pad_to = fn, sharding, pad_to

  def __call__(self, state, local_batch: dict, steps: int = 1):
    if steps != 1:
      raise ParallelError('several steps per call need data.on_device')
    if self.pad_to > 1:
      local_batch = _pad_rows(local_batch, self.pad_to)
    return self.fn(state, global_batch(local_batch, self.sharding))

  def cost_analysis(self):
    return cost_analysis(self.fn)


class DeviceSteps:
  """Compiled train steps on device-resident data: one per call, or `steps_per_call` in a loop.

  The loop's metrics come back stacked, one entry per step.
  """

  def __init__(self, one, many, steps_per_call: int):
    self.one, self.many, self.steps_per_call = one, many, steps_per_call

  def __call__(self, state, inputs: dict, steps: int = 1):
    if steps == 1:
      return self.one(state, inputs)
    if steps != self.steps_per_call:
      raise ParallelError(f'compiled for 1 or {self.steps_per_call} steps per call, not {steps}')
    return self.many(state, inputs)

  def cost_analysis(self):  # of one step
    return cost_analysis(self.one)


def cost_analysis(compiled) -> dict:
  """XLA's cost analysis of `compiled`, its FLOPs including oneDNN's convolutions (unseen by XLA)."""
  cost = dict(compiled.cost_analysis() or {})
  cost['flops'] = cost.get('flops', 0.0) + onednn.flops(compiled.as_text())
  return cost


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def compile_steps(strategy: str, mesh: Mesh, state: Any, local_batch: dict,
                  make_batch: Callable[[Any, jax.Array], dict] | None = None,
                  steps_per_call: int = 1, eval_tta: str = 'none',
                  compiler: Callable[[Any, tuple, str], Any] = compile_cache.compile_plain,
                  grad_norm: bool = True) -> tuple[Step | DeviceSteps, Step]:
  """(train, eval) steps for `strategy`; the train step is compiled now for `local_batch`'s shape.

  The train step donates the state it is given, which must be laid out as `state_shardings`.
  With `make_batch(inputs, step)` (device-resident data, 'jit' only) the train step takes those
  replicated device inputs in place of a batch and makes the batch itself, split over the mesh;
  with `steps_per_call` > 1 it can also run that many steps in one call (`lax.scan`).
  The eval step averages over the test-time augmentations `eval_tta` (steps.tta_logits).
  `compiler(jitted, args, name)` compiles the train steps (compile_cache.Compiler: across runs).
  Without `grad_norm` the train step's metrics leave out the gradients' norm.
  """
  check_strategy(strategy, mesh)
  shardings = state_shardings(state, mesh)
  batch = batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  eval_fn = jax.jit(functools.partial(eval_step, tta=eval_tta), in_shardings=(shardings, batch), out_shardings=replicated)
  local_shards = batch_shards(mesh) // jax.process_count()
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  if make_batch is not None:
    if strategy != 'jit':
      raise ParallelError("data.on_device runs with parallel.strategy 'jit'; set one of them")

    def step_on_device_data(state, inputs):
      made = jax.lax.with_sharding_constraint(make_batch(inputs, state.step), batch)
      return train_step(state, made, grad_norm=grad_norm)

    def steps_on_device_data(state, inputs):
      return jax.lax.scan(lambda state, _: step_on_device_data(state, inputs), state,
                          length=steps_per_call)

    compile = lambda fn, name: compiler(
        jax.jit(fn, in_shardings=(shardings, replicated), out_shardings=(shardings, replicated),
                donate_argnums=0), (abstract_state, local_batch), name)
    many = compile(steps_on_device_data, f'{steps_per_call} steps') if steps_per_call > 1 else None
    return (DeviceSteps(compile(step_on_device_data, 'step'), many, steps_per_call),
            Step(eval_fn, batch, pad_to=local_shards))
  if strategy == 'jit':
    step = functools.partial(train_step, grad_norm=grad_norm)
  else:
    # check_vma=False: the classic pmap semantics (per-device gradients, explicit pmean); the
    # batch slices over 'data' and everything else is replicated.
    per_device = functools.partial(train_step, axis_name='data', grad_norm=grad_norm)
    step = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P('data')),
                         out_specs=(P(), P()), check_vma=False)
  train_fn = jax.jit(step, in_shardings=(shardings, batch), out_shardings=(shardings, replicated),
                     donate_argnums=0)
  global_shapes = {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(), *v.shape[1:]),
                                           v.dtype, sharding=batch)
                   for k, v in local_batch.items()}
  compiled = compiler(train_fn, (abstract_state, global_shapes), f'{strategy} step')
  return Step(compiled, batch), Step(eval_fn, batch, pad_to=local_shards)


def describe(mesh: Mesh, strategy: str) -> str:
  """One line for the log: strategy, mesh and processes."""
  axes = ' x '.join(f'{a} {mesh.shape[a]}' for a in MESH_AXES)
  return (f'{strategy} on {mesh.devices.size} {mesh.devices.flat[0].platform} devices '
          f'({axes}) in {jax.process_count()} process(es)')
