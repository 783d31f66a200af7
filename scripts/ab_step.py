"""Which of two or more builds of one model's train step is faster, measured in one process.

  python scripts/ab_step.py --model seed_cnn --batch_size 128 \\
      --variant '{}' --variant '{"env": {"JAXMODEL_ONEDNN": "0"}}' [--rounds 20] [--images 3000]

A variant is a JSON object: "env", environment variables set while its step is traced and
compiled (jaxmodel reads its switches, e.g. JAXMODEL_ONEDNN=0 or JAXMODEL_XLA_CONV=1, at trace
time), and "xla", XLA compiler options for its compilation (e.g. {"xla_cpu_use_onednn": true}).
Each variant's step is built as scripts/benchmark.py builds it (the config's model and
optimizer, one fixed random batch), all in this process. Then rounds run every variant in turn
for about --images images each (A B C A B C ...), and the table gives each variant's median
images/s and, against the first variant, the median and quartiles of the per-round speed ratios.
A ratio within one round compares runs seconds apart, so the machine's drift, which moves
separate processes' figures by 5-15% here, mostly cancels. Like `jaxmodel.train`, the process
runs with huge pages for malloc (jaxmodel/memory.py). Run it alone on the machine.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (scripts/ is not a package)


def build(spec: dict, batch_size: int, variant: dict):
  """Builds the variant's step with its environment set, and restores the environment after."""
  saved = dict(os.environ)
  os.environ.update({k: str(v) for k, v in variant.get('env', {}).items()})
  try:
    return benchmark.jax_step(spec, batch_size, variant.get('xla') or None)
  finally:
    os.environ.clear()
    os.environ.update(saved)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='seed_cnn', choices=sorted(benchmark.CONFIGS))
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--variant', action='append', default=[],
                      help='JSON: {"env": {...}, "xla": {...}}; give two or more')
  parser.add_argument('--rounds', type=int, default=20)
  parser.add_argument('--images', type=int, default=3000, help='per variant per round')
  args = parser.parse_args(argv)
  if len(args.variant) < 2:
    parser.error('give at least two --variant values, e.g. --variant \'{}\' '
                 '--variant \'{"env": {"JAXMODEL_ONEDNN": "0"}}\'')
  try:
    variants = [json.loads(v) for v in args.variant]
  except json.JSONDecodeError as error:
    parser.error(f'a --variant is not JSON ({error}); quote it, e.g. \'{{"env": {{}}}}\'')
  for v in variants:
    if not isinstance(v, dict) or set(v) - {'env', 'xla'}:
      parser.error(f'a variant is a JSON object with keys "env" and/or "xla", not {v!r}')

  import jax
  spec = benchmark.model_spec(args.model)
  steps, states, batch = [], [], None
  for v in variants:
    compiled, state, batch, _ = build(spec, args.batch_size, v)
    state, _ = compiled(state, batch)  # the first call's costs are not timed
    jax.block_until_ready(state)
    steps.append(compiled)
    states.append(state)

  calls = max(2, args.images // args.batch_size)
  seconds = [[] for _ in variants]  # per image, per round
  for _ in range(args.rounds):
    for i, step in enumerate(steps):
      start = time.perf_counter()
      for _ in range(calls):
        states[i], _ = step(states[i], batch)
      jax.block_until_ready(states[i])
      seconds[i].append((time.perf_counter() - start) / (calls * args.batch_size))

  print(f'{args.model}, batch {args.batch_size}: {args.rounds} rounds of {calls} steps per '
        f'variant')
  print('| variant | img/s median | speed vs the first, median [q25-q75] |')
  print('|---|---:|---:|')
  for i, v in enumerate(variants):
    ratios = [a / b for a, b in zip(seconds[0], seconds[i])]
    print(f'| `{json.dumps(v)}` | {1 / statistics.median(seconds[i]):,.0f} | '
          f'{statistics.median(ratios):.3f} [{np.percentile(ratios, 25):.3f}-'
          f'{np.percentile(ratios, 75):.3f}] |')


if __name__ == '__main__':
  from jaxmodel import memory
  memory.use_huge_pages()  # as jaxmodel.train runs
  main()
