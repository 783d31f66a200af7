"""Train-step throughput: jaxmodel (JAX, jit) against PyTorch eager, same networks and optimizers.

  python scripts/benchmark.py [--models seed_cnn,airbench,airbench94,resnet,resnet34]
                              [--batch_sizes 128,512]
                              [--repeats 3] [--seconds 8] [--out experiments/benchmark-cpu.md]

Method. Every measurement is a fresh subprocess running one framework alone, so JAX and PyTorch
never share the CPU nor a process; rounds interleave them (JAX, PyTorch, JAX, PyTorch, ...) so a
slow drift of the machine hits both alike, and the table shows medians over --repeats rounds with
their min-max. A subprocess builds the model, optimizer and one fixed random CIFAR-shaped batch,
warms up (JAX compiles; both run ~1 s of steps, which also sizes the run), then times K steps
chosen to take about --seconds. Data loading is not measured: only the train step.

- Models, optimizers and loss come from the bundled configs: seed_cnn from `seed_tutorial` (the
  PyTorch tutorial net, SGD momentum 0.9), airbench from `cifar`, airbench94 (the full-width net;
  only when asked; its lookahead averaging runs on the JAX side only) from `cifar_speedrun`,
  resnet (CIFAR ResNet-18, slow; only when asked) from `default`, resnet34 (slower still) from
  `cifar_resnet34`.
- JAX: `jax.jit(jaxmodel.train_step, donate_argnums=0)` on `create_train_state` with
  `make_optimizer(config.optimizer, total_steps)` and the config's lookahead, exactly what
  `jaxmodel.train` runs; its FLOPs
  per step are XLA's cost analysis of the compiled step. Its worker runs with huge pages for
  malloc, as `jaxmodel.train` does (jaxmodel/memory.py); `--huge_pages both` gives PyTorch's
  worker the same.
- PyTorch: eager, NCHW, `torch.set_num_threads(--torch_threads)` (2 = the cores here, said
  explicitly rather than left to the default), model.train(), zero_grad/backward/step. The twins
  use the same layers, initial BatchNorm settings, loss and optimizer: the config's lr multipliers
  become parameter groups (multiplier m: lr x m, weight decay / m, as make_optimizer does; 0:
  requires_grad False) matched by the same regexes on Flax-style names (the twins name their
  modules as Flax does), and the config's schedule runs through LambdaLR.
"""

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

CONFIGS = {'seed_cnn': 'seed_tutorial', 'airbench': 'cifar', 'airbench94': 'cifar_speedrun',
           'resnet': 'default', 'resnet34': 'cifar_resnet34'}
# The model a config trains, where not the benchmark's name.
MODELS = {'airbench94': 'airbench', 'resnet34': 'resnet'}
DEFAULT_BATCHES = {'seed_cnn': (4, 128, 512), 'airbench': (128, 512), 'airbench94': (128, 512),
                   'resnet': (128, 512), 'resnet34': (128, 512)}
NUM_CLASSES = 10
NOMINAL_TOTAL_STEPS = 10_000  # the schedule's length; the rate per step does not depend on it


def timed_run(step, sync, seconds: float) -> dict:
  """Warms `step` up, sizes K to take about `seconds`, and times K steps (synced at the end)."""
  start = time.perf_counter()
  step()
  sync()
  first_step = time.perf_counter() - start  # first-call costs (JAX compiles ahead, apart)
  # Size K from chunks of doubling length, synced per chunk: this keeps JAX's async dispatch
  # overlapping steps as in the timed run, and ends up warm (caches, allocator) on both sides.
  n = 1
  while True:
    start = time.perf_counter()
    for _ in range(n):
      step()
    sync()
    chunk = time.perf_counter() - start
    if chunk >= min(1.0, seconds / 8):
      break
    n *= 2
  steps = max(3, round(seconds * n / chunk))
  start = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  elapsed = time.perf_counter() - start
  return {'steps': steps, 'seconds': elapsed, 'first_step_seconds': first_step}


# ---------------------------------------------------------------------------------------------
# JAX

def jax_step(spec: dict, batch_size: int, compiler_options: dict | None = None):
  """The compiled train step of `spec` (as `jaxmodel.train` runs it), a state, a fixed batch and
  the seconds the compilation took."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  import jaxmodel
  from jaxmodel import optim

  model_kwargs = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in spec['model'].items() if k != 'name'}
  model = jaxmodel.get_model(spec['model']['name'], num_classes=NUM_CLASSES, **model_kwargs)
  optimizer_config = ml_collections.ConfigDict(spec['optimizer'])
  tx = jaxmodel.make_optimizer(optimizer_config, NOMINAL_TOTAL_STEPS)
  loss_fn = jaxmodel.get_loss(spec['loss'], spec['label_smoothing'])
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.standard_normal((batch_size, 32, 32, 3), np.float32)),
           'label': jnp.asarray(rng.integers(0, NUM_CLASSES, batch_size, np.int32))}
  lookahead = optim.make_lookahead(optimizer_config, NOMINAL_TOTAL_STEPS)
  state = jaxmodel.create_train_state(model, tx, batch['image'], jax.random.PRNGKey(0), loss_fn,
                                      lookahead=lookahead)
  start = time.perf_counter()
  compiled = jax.jit(jaxmodel.train_step, donate_argnums=0).lower(state, batch).compile(
      compiler_options=compiler_options)
  return compiled, state, batch, time.perf_counter() - start


def jax_worker(model_name: str, batch_size: int, spec: dict, seconds: float) -> dict:
  import jax
  from jaxmodel import parallel

  compiled, state, batch, compile_seconds = jax_step(spec, batch_size)
  cost = parallel.cost_analysis(compiled)  # XLA's, plus oneDNN's convolutions
  holder = [state]

  def step():
    holder[0], _ = compiled(holder[0], batch)

  result = timed_run(step, lambda: jax.block_until_ready(holder[0]), seconds)
  flops = float(cost.get('flops', float('nan')))
  return {**result, 'compile_seconds': compile_seconds, 'flops_per_step': flops,
          'gflops_per_s': flops * result['steps'] / result['seconds'] / 1e9,
          'backend': jax.default_backend(), 'devices': len(jax.devices())}


# ---------------------------------------------------------------------------------------------
# PyTorch twins, named like the Flax modules (ConvGroup_0/BatchNorm_1/bias) so the config's
# lr-multiplier regexes select the same parameters.

def torch_model(spec: dict):
  import torch
  import torch.nn as nn
  import torch.nn.functional as F

  def batch_norm(width, flax_momentum, eps=1e-5, use_scale=True):
    # Flax keeps momentum x old + (1 - momentum) x batch; PyTorch's momentum is the batch weight.
    norm = nn.BatchNorm2d(width, eps=eps, momentum=1 - flax_momentum)
    if not use_scale:
      norm.weight.requires_grad_(False)  # Flax use_scale=False: a scale fixed at 1
    return norm

  class ConvGroup(nn.Module):
    def __init__(self, c_in, width):
      super().__init__()
      self.Conv_0 = nn.Conv2d(c_in, width, 3, padding=1, bias=False)
      self.BatchNorm_0 = batch_norm(width, 0.6, eps=1e-12, use_scale=False)
      self.Conv_1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
      self.BatchNorm_1 = batch_norm(width, 0.6, eps=1e-12, use_scale=False)

    def forward(self, x):
      # Flax's nn.gelu is the tanh approximation by default; PyTorch's is exact unless told.
      x = F.gelu(self.BatchNorm_0(F.max_pool2d(self.Conv_0(x), 2)), approximate='tanh')
      return F.gelu(self.BatchNorm_1(self.Conv_1(x)), approximate='tanh')

  class Airbench(nn.Module):
    def __init__(self, widths=(64, 256, 256), whiten_width=24, whiten_stride=1, head_scale=1 / 9):
      super().__init__()
      self.whiten = nn.Conv2d(3, whiten_width, 2, stride=whiten_stride)  # bias, as in Flax
      c_in = whiten_width
      for i, width in enumerate(widths):
        self.add_module(f'ConvGroup_{i}', ConvGroup(c_in, width))
        c_in = width
      self.Dense_0 = nn.Linear(c_in, NUM_CLASSES, bias=False)
      self.head_scale = head_scale
      self.num_groups = len(widths)

    def forward(self, x):
      x = F.gelu(self.whiten(x), approximate='tanh')
      for i in range(self.num_groups):
        x = getattr(self, f'ConvGroup_{i}')(x)
      return self.Dense_0(x.amax(dim=(2, 3))) * self.head_scale

  class ResidualBlock(nn.Module):
    def __init__(self, c_in, width, stride):
      super().__init__()
      self.Conv_0 = nn.Conv2d(c_in, width, 3, stride, padding=1, bias=False)
      self.BatchNorm_0 = batch_norm(width, 0.9)
      self.Conv_1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
      self.BatchNorm_1 = batch_norm(width, 0.9)
      nn.init.zeros_(self.BatchNorm_1.weight)  # each block starts as the identity, as in Flax
      self.projection = stride != 1 or c_in != width
      if self.projection:
        self.Conv_2 = nn.Conv2d(c_in, width, 1, stride, bias=False)
        self.BatchNorm_2 = batch_norm(width, 0.9)

    def forward(self, x):
      y = F.relu(self.BatchNorm_0(self.Conv_0(x)))
      y = self.BatchNorm_1(self.Conv_1(y))
      if self.projection:
        x = self.BatchNorm_2(self.Conv_2(x))
      return F.relu(x + y)

  class ResNet(nn.Module):
    def __init__(self, stage_sizes=(2, 2, 2, 2), width=64, dropout=0.0):
      super().__init__()
      self.Conv_0 = nn.Conv2d(3, width, 3, padding=1, bias=False)
      self.BatchNorm_0 = batch_norm(width, 0.9)
      blocks, c_in = [], width
      for stage, num_blocks in enumerate(stage_sizes):
        for block in range(num_blocks):
          blocks.append(ResidualBlock(c_in, width * 2**stage, 2 if stage > 0 and block == 0 else 1))
          c_in = width * 2**stage
      self.blocks = nn.Sequential(*blocks)
      self.dropout = nn.Dropout(dropout)
      self.Dense_0 = nn.Linear(c_in, NUM_CLASSES)

    def forward(self, x):
      x = self.blocks(F.relu(self.BatchNorm_0(self.Conv_0(x))))
      return self.Dense_0(self.dropout(x.mean(dim=(2, 3))))

  from torch_tutorial import Net  # the tutorial net itself (this script's folder is on sys.path)
  kwargs = {k: v for k, v in spec['model'].items() if k != 'name'}
  name = spec['model']['name']
  if name == 'seed_cnn':
    return Net()
  return {'airbench': Airbench, 'resnet': ResNet}[name](**kwargs)


def lr_factor(optimizer: dict, total_steps: int):
  """make_schedule's shape (jaxmodel/optim.py) as step -> fraction of the peak, without JAX."""
  if optimizer['schedule'] == 'constant':
    return lambda step: 1.0
  warmup = min(int(round(optimizer['warmup_fraction'] * total_steps)), total_steps - 1)
  decay_steps = max(total_steps - warmup, 1)
  init, final = optimizer['init_scale'], optimizer['final_scale']

  def factor(step):
    if step < warmup:
      return init + (1 - init) * step / warmup
    t = min(step - warmup, decay_steps) / decay_steps
    if optimizer['schedule'] == 'warmup_cosine':
      return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))
    return 1 + (final - 1) * t
  return factor


def torch_optimizer(model, optimizer: dict):
  """SGD as make_optimizer builds it: lr multipliers as parameter groups, L2 weight decay."""
  import torch
  if optimizer['name'] != 'sgd':
    raise SystemExit(f"the PyTorch twin supports sgd only, not {optimizer['name']!r}")
  lr, decay, momentum = optimizer['learning_rate'], optimizer['weight_decay'], optimizer['momentum']
  multipliers = dict((pattern, m) for pattern, m in optimizer['lr_multipliers'])
  groups = {}
  for name, param in model.named_parameters():
    if not param.requires_grad:
      continue
    flax_name = re.sub(r'(^|/)weight$', r'\1kernel', name.replace('.', '/'))
    multiplier = next((m for p, m in multipliers.items() if re.search(p, flax_name)), 1.0)
    if multiplier == 0:
      param.requires_grad_(False)  # frozen: no gradient computed at all
    else:
      groups.setdefault(multiplier, []).append(param)
  param_groups = [{'params': params, 'lr': lr * m, 'weight_decay': decay / m}
                  for m, params in groups.items()]
  sgd = torch.optim.SGD(param_groups, lr=lr, momentum=momentum,
                        nesterov=optimizer['nesterov'] and momentum > 0)
  schedule = torch.optim.lr_scheduler.LambdaLR(sgd, lr_factor(optimizer, NOMINAL_TOTAL_STEPS))
  return sgd, schedule, optimizer['grad_clip_norm']


def torch_worker(model_name: str, batch_size: int, spec: dict, seconds: float,
                 threads: int) -> dict:
  import torch
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = torch_model(spec)
  model.train()
  sgd, schedule, clip = torch_optimizer(model, spec['optimizer'])
  if spec['loss'] != 'cross_entropy':
    raise SystemExit(f"the PyTorch twin supports the cross_entropy loss only, not {spec['loss']!r}")
  criterion = torch.nn.CrossEntropyLoss(label_smoothing=spec['label_smoothing'])
  images = torch.randn(batch_size, 3, 32, 32)
  labels = torch.randint(0, NUM_CLASSES, (batch_size,))

  def step():
    sgd.zero_grad()
    loss = criterion(model(images), labels)
    loss.backward()
    if clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    sgd.step()
    schedule.step()

  result = timed_run(step, lambda: None, seconds)  # eager on CPU: each op is done when it returns
  return {**result, 'threads': torch.get_num_threads(),
          'interop_threads': torch.get_num_interop_threads()}


# ---------------------------------------------------------------------------------------------
# The driver: one subprocess per measurement, JAX and PyTorch alternating.

def model_spec(model_name: str) -> dict:
  from jaxmodel.config import load_config
  config = load_config(CONFIGS[model_name])
  if config.model.name != MODELS.get(model_name, model_name):
    raise SystemExit(f'config {CONFIGS[model_name]!r} now trains {config.model.name!r}, '
                     f'not {model_name!r}; update CONFIGS in {__file__}')
  return {'config': CONFIGS[model_name], 'model': config.model.to_dict(),
          'optimizer': config.optimizer.to_dict(), 'loss': config.loss,
          'label_smoothing': config.label_smoothing}


def measure(framework: str, model_name: str, batch_size: int, spec: dict, args) -> dict:
  command = [sys.executable, os.path.abspath(__file__), '--worker', framework,
             '--models', model_name, '--batch_sizes', str(batch_size),
             '--seconds', str(args.seconds), '--torch_threads', str(args.torch_threads),
             '--spec', json.dumps(spec)]
  from jaxmodel import memory
  # Huge pages for malloc, as jaxmodel's programs run (jaxmodel/memory.py); for PyTorch if asked.
  huge_pages = framework == 'jax' or args.huge_pages == 'both'
  env = (huge_pages and memory.huge_pages_environment(os.environ)) or dict(os.environ)
  done = subprocess.run(command, capture_output=True, text=True, env=env)
  if done.returncode != 0:
    sys.stderr.write(done.stderr)
    raise SystemExit(f'{framework} {model_name} batch {batch_size}: worker failed '
                     f'(exit {done.returncode})')
  result = json.loads(done.stdout.strip().splitlines()[-1])
  result['images_per_s'] = batch_size * result['steps'] / result['seconds']
  return result


def commit() -> str:
  """This checkout's commit for a results file, saying so when tracked files were changed."""
  git = lambda *a: subprocess.run(['git', *a], capture_output=True, text=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  described = git('rev-parse', '--short', 'HEAD') or 'unknown'
  if git('status', '--porcelain', '--untracked-files=no'):
    described += ' with uncommitted changes'
  return described


def machine() -> str:
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
    model = re.search(r'Model name:\s*(.+)', lscpu).group(1).strip()
  except (OSError, AttributeError):
    model = 'unknown CPU'
  version = lambda package: importlib.metadata.version(package)
  return (f'{model}, {len(os.sched_getaffinity(0))} cores; Python {sys.version.split()[0]}, '
          f'jax {version("jax")} / jaxlib {version("jaxlib")}, flax {version("flax")}, '
          f'optax {version("optax")}, torch {version("torch")}')


def rate(values: list[float]) -> str:
  return f'{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})'


def table(results: dict) -> str:
  lines = ['| model | batch | JAX img/s median (min-max) | PyTorch img/s median (min-max) '
           '| JAX/PyTorch | JAX GFLOP/s |', '|---|---:|---:|---:|---:|---:|']
  for (model_name, batch_size), runs in results.items():
    jax_rates = [r['images_per_s'] for r in runs['jax']]
    torch_rates = [r['images_per_s'] for r in runs['torch']]
    if not jax_rates or not torch_rates:
      continue
    ratio = statistics.median(jax_rates) / statistics.median(torch_rates)
    gflops = statistics.median(r['gflops_per_s'] for r in runs['jax'])
    lines.append(f'| {model_name} | {batch_size} | {rate(jax_rates)} | {rate(torch_rates)} '
                 f'| {ratio:.2f}x | {gflops:.1f} |')
  return '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='seed_cnn,airbench',
                      help=f'comma-separated, from {",".join(CONFIGS)}')
  parser.add_argument('--batch_sizes', default='',
                      help='comma-separated, for every model (default: 4,128,512 for seed_cnn, '
                           '128,512 for the others)')
  parser.add_argument('--repeats', type=int, default=3, help='rounds of JAX, PyTorch')
  parser.add_argument('--seconds', type=float, default=8.0, help='timed seconds per measurement')
  parser.add_argument('--torch_threads', type=int, default=2)
  parser.add_argument('--huge_pages', choices=('jax', 'both'), default='jax',
                      help="which workers run with glibc's huge-page tunable: JAX's, as "
                           "jaxmodel's programs do (the default), or both")
  parser.add_argument('--out', help='also write the table and its context to this markdown file')
  parser.add_argument('--worker', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  parser.add_argument('--spec', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  models = [m for m in args.models.split(',') if m]
  unknown = sorted(set(models) - set(CONFIGS))
  if unknown:
    parser.error(f'unknown models {unknown}; choose from {sorted(CONFIGS)}')

  if args.worker:
    batch_size = int(args.batch_sizes)
    spec = json.loads(args.spec)
    if args.worker == 'jax':
      result = jax_worker(models[0], batch_size, spec, args.seconds)
    else:
      result = torch_worker(models[0], batch_size, spec, args.seconds, args.torch_threads)
    print(json.dumps(result))
    return

  cases = [(m, b) for m in models for b in
           ([int(b) for b in args.batch_sizes.split(',')] if args.batch_sizes
            else DEFAULT_BATCHES[m])]
  specs = {m: model_spec(m) for m in models}
  results = {case: {'jax': [], 'torch': []} for case in cases}
  total, count, start = 2 * len(cases) * args.repeats, 0, time.perf_counter()
  for round_index in range(args.repeats):
    for model_name, batch_size in cases:
      for framework in ('jax', 'torch'):
        count += 1
        r = measure(framework, model_name, batch_size, specs[model_name], args)
        results[model_name, batch_size][framework].append(r)
        print(f'[{count}/{total}] round {round_index + 1} {framework:5} {model_name} batch '
              f'{batch_size}: {r["images_per_s"]:,.0f} img/s ({r["steps"]} steps in '
              f'{r["seconds"]:.1f} s) | {time.perf_counter() - start:.0f} s so far',
              file=sys.stderr, flush=True)
  text = table(results)
  print(text)
  if args.out:
    command = ' '.join(shlex.quote(a) for a in ['python', 'scripts/benchmark.py', *sys.argv[1:]])
    raw = '\n'.join(json.dumps({'model': m, 'batch': b, 'framework': f, **{
        k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}})
        for (m, b), runs in results.items() for f in ('jax', 'torch') for r in runs[f])
    sources = ', '.join(f"{m} from `{spec['config']}`" for m, spec in specs.items())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      f.write(f'# Train-step throughput: jaxmodel (JAX) vs PyTorch eager, CPU\n\n'
              f'- command: `{command}`\n'
              f'- commit: {commit()}\n'
              f'- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n'
              f'- machine: {machine()}\n'
              f'- PyTorch threads: torch.set_num_threads({args.torch_threads}); huge pages '
              f'for malloc (jaxmodel/memory.py): {args.huge_pages}; '
              f'total time {time.perf_counter() - start:.0f} s\n\n'
              f'Synthetic CIFAR-shaped data (one fixed random batch), train step only. Each '
              f'measurement is its own subprocess, JAX and PyTorch alternating, rounds: '
              f'{args.repeats}; about {args.seconds:g} s timed each after a warm-up (JAX: compilation). '
              f'Medians (min-max) of images/s. JAX GFLOP/s: XLA cost-analysis FLOPs of the '
              f'compiled train step (plus its oneDNN convolutions\') x steps / time. Configs: '
              f'{sources}. '
              f'Method details: the docstring of scripts/benchmark.py.\n\n'
              f'{text}\n\n<details><summary>every measurement</summary>\n\n```\n{raw}\n```\n'
              f'</details>\n')


if __name__ == '__main__':
  main()
