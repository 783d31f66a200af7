"""Does the input pipeline keep up? A config's Grain pipeline alone against its train step alone.

  python scripts/pipeline_benchmark.py --data_dir /tmp/tfds_full [--dataset cifar10_jpeg]
      [--config cifar [--config 'cifar data.in_memory=False' ...]] [--rounds 3] [--seconds 10]
      [--out experiments/pipeline-cpu.md]

A --config is a config name, optionally followed by KEY=VALUE overrides (default: `cifar` and
`default`). For each that reads its data through the Grain pipeline (data.on_device False), in
one process, rounds alternate (pipeline, step, pipeline, step, ...):
- the pipeline: `data.train_dataset` built as `jaxmodel.train` builds it (the config's split,
  preprocessing, batch size, threads, prefetch and workers; with data.in_memory the split is
  decoded into memory first, which the log reports), a fresh iterator per round, 3 batches to
  warm up, then `next()` for about --seconds; images/s.
- the step: the config's compiled train step (model, optimizer, loss and lookahead, as
  scripts/benchmark.py builds it) on one fixed device-resident batch, timed for about --seconds.
The table gives each one's median images/s (min-max) and the ratio of the medians: how many
times over the pipeline could feed the step (issue #3's target 4 asks for 5x). Each is measured
with the machine to itself; in a real run the two share the cores, which the trainer's loop vs
bare-step figure (scripts/recipe_benchmark.py) measures. Like `jaxmodel.train`, the process runs
with huge pages for malloc (jaxmodel/memory.py). Run it alone on the machine.
"""

import argparse
import os
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (scripts/ is not a package)

WARMUP_BATCHES = 3


def pipeline_rate(dataset, batch_size: int, seconds: float) -> dict:
  """Images/s of `next()` on a fresh iterator of `dataset`, after a warm-up."""
  iterator = iter(dataset)
  for _ in range(WARMUP_BATCHES):
    next(iterator)
  batches, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(iterator)
    batches += 1
  elapsed = time.perf_counter() - start
  close = getattr(iterator, 'close', None)
  if close:  # stops its reader threads and worker processes before the step runs
    close()
  return {'images_per_s': batches * batch_size / elapsed, 'batches': batches}


def step_rate(spec: dict, batch_size: int, seconds: float) -> dict:
  """Images/s of the config's compiled train step, timed as scripts/benchmark.py times it."""
  result = benchmark.jax_worker(spec['model']['name'], batch_size, spec, seconds)
  return {'images_per_s': result['steps'] * batch_size / result['seconds'],
          'steps': result['steps']}


def config_case(config_spec: str, dataset: str, data_dir: str, split: str):
  """(spec for the step, the pipeline, batch size) of 'NAME [KEY=VALUE ...]', or None if it has
  no pipeline."""
  from jaxmodel import data
  from jaxmodel.config import load_config, override
  name, *overrides = config_spec.split()
  config = load_config(name)
  for setting in overrides:
    override(config, *setting.split('=', 1))
  if config.data.on_device:
    return None
  source, _ = data.open_split(dataset, split, data_dir)
  if config.data.in_memory:
    start = time.perf_counter()
    source = data.InMemory(source)
    print(f'{config_spec}: {len(source):,} images decoded into memory in '
          f'{time.perf_counter() - start:.1f} s', file=sys.stderr, flush=True)
  pipeline = data.train_dataset(
      source, data.preprocess_from_config(config, train=True), config.batch_size,
      seed=config.seed, prefetch=config.data.prefetch, num_workers=config.data.num_workers)
  spec = {'config': name, 'model': config.model.to_dict(), 'optimizer': config.optimizer.to_dict(),
          'loss': config.loss, 'label_smoothing': config.label_smoothing}
  return spec, pipeline, config.batch_size


def table(results: dict) -> str:
  lines = ['| config | model | batch | pipeline img/s median (min-max) '
           '| train step img/s median (min-max) | pipeline / step |',
           '|---|---|---:|---:|---:|---:|']
  for name, r in results.items():
    pipe = [x['images_per_s'] for x in r['pipeline']]
    step = [x['images_per_s'] for x in r['step']]
    lines.append(f"| `{name}` | {r['model']} | {r['batch']} | {benchmark.rate(pipe)} "
                 f"| {benchmark.rate(step)} | {statistics.median(pipe) / statistics.median(step):.1f}x |")
  return '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', required=True, help='TFDS data dir holding --dataset')
  parser.add_argument('--dataset', default='cifar10_jpeg')
  parser.add_argument('--split', default='train[:90%]', help='the split the pipeline reads')
  parser.add_argument('--config', action='append', dest='configs',
                      help="a config name and optional overrides, e.g. 'cifar data.prefetch=8'; "
                           'repeat it for several (those with data.on_device are skipped)')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--seconds', type=float, default=10.0, help='timed seconds per measurement')
  parser.add_argument('--out', help='also write the table and its context to this markdown file')
  args = parser.parse_args(argv)

  from jaxmodel import memory
  memory.use_huge_pages()  # as jaxmodel.train runs
  cases = {}
  for name in args.configs or ['cifar', 'default']:
    case = config_case(name, args.dataset, args.data_dir, args.split)
    if case is None:
      print(f'{name}: data.on_device, no pipeline to measure; skipped', file=sys.stderr)
      continue
    cases[name] = case
  results = {name: {'model': spec['model']['name'], 'batch': batch, 'pipeline': [], 'step': []}
             for name, (spec, _, batch) in cases.items()}
  start = time.perf_counter()
  for round_index in range(args.rounds):
    for name, (spec, pipeline, batch) in cases.items():
      for kind in ('pipeline', 'step'):
        r = (pipeline_rate(pipeline, batch, args.seconds) if kind == 'pipeline'
             else step_rate(spec, batch, args.seconds))
        results[name][kind].append(r)
        print(f'round {round_index + 1} {name} {kind}: {r["images_per_s"]:,.0f} img/s | '
              f'{time.perf_counter() - start:.0f} s so far', file=sys.stderr, flush=True)
  text = table(results)
  print(text)
  if args.out:
    command = ' '.join(shlex.quote(a) for a in ['python', 'scripts/pipeline_benchmark.py',
                                                *sys.argv[1:]])
    with open(args.out, 'w') as f:
      f.write(f'# Input pipeline vs train step, CPU\n\n- command: `{command}`\n'
              f'- commit: {benchmark.commit()}\n- machine: {benchmark.machine()}\n'
              f'- data: {args.dataset} {args.split}; rounds: {args.rounds}, about '
              f'{args.seconds:g} s timed each, pipeline and step alternating\n\n'
              f'Method: the docstring of scripts/pipeline_benchmark.py.\n\n{text}\n')


if __name__ == '__main__':
  main()
