"""The seed recipe end to end: jaxmodel's trainer, the PyTorch tutorial program, and a bare step.

  python scripts/recipe_benchmark.py --data_dir /tmp/tfds_full [--repeats 3]
                                     [--programs jaxmodel,pytorch,bare] [--out experiments/F.md]
                                     [--config cifar --set num_epochs=1 ...]

Each round runs the programs one after another, each in a fresh process and alone on the machine:
- jaxmodel: `python -m jaxmodel.train --config=seed_tutorial` (the whole loop: data, metrics,
  checkpoints, evaluation); its rate is summary.json's train images/s, which excludes compiling
  and evaluating.
- pytorch: `scripts/torch_tutorial.py`, the tutorial's program on the same data in memory.
- bare: the same compiled steps as jaxmodel's (device-resident data, `steps_per_dispatch` steps
  per call) called in a plain loop for the same number of steps, with nothing else: no metrics
  read, no checkpoints, no evaluation. jaxmodel / bare is what the library's loop costs.
The table gives medians (min-max) over rounds, each program's ratio to PyTorch, and validation
accuracy where the program measures it.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAMS = ('jaxmodel', 'pytorch', 'bare')


def bare_worker(config_spec: str, data_dir: str, overrides: list[str]) -> dict:
  import jax
  from jaxmodel import data, device_data, models, optim, parallel, steps
  from jaxmodel.config import load_config, override

  config = load_config(config_spec)
  for setting in overrides:
    override(config, *setting.split('=', 1))
  parallel.set_cpu_threads(config.parallel.cpu_threads)  # as the trainer does, before the devices
  source, info = data.open_split(config.dataset, config.train_split, data_dir)
  mesh = parallel.make_mesh(config.parallel.mesh)
  batches = device_data.TrainBatches(len(source), config.batch_size, config.seed,
                                     device_data.augment_from_config(config))
  arrays = jax.device_put(data.load_split(source), parallel.replicated(mesh))
  total_steps = batches.steps_per_epoch * config.num_epochs
  model_kwargs = {k: v for k, v in config.model.items() if k != 'name'}  # as the trainer's
  model = models.get_model(config.model.name, num_classes=info.features['label'].num_classes,
                           **model_kwargs)
  tx = optim.make_optimizer(config.optimizer, total_steps)
  example = jax.numpy.zeros((config.batch_size, *info.features['image'].shape))
  state = parallel.create_state(lambda: steps.create_train_state(
      model, tx, example, jax.random.PRNGKey(config.seed),
      steps.get_loss(config.loss, config.label_smoothing),
      lookahead=optim.make_lookahead(config.optimizer, total_steps)), mesh)
  state = parallel.put(state, parallel.state_shardings(state, mesh))
  inputs = device_data.StepInputs(batches, arrays, 0)
  train_fn, _ = parallel.compile_steps('jit', mesh, state, next(inputs), batches.from_inputs,
                                       config.steps_per_dispatch, grad_norm=config.log_grad_norm)
  per_call = config.steps_per_dispatch
  # The permutation of each epoch, made before timing: the loop below only calls the steps.
  epoch_inputs = [next(device_data.StepInputs(batches, arrays, e * batches.steps_per_epoch))
                  for e in range(config.num_epochs)]
  start = time.perf_counter()
  step = 0
  while step < total_steps:
    call = per_call if (step % batches.steps_per_epoch) + per_call <= batches.steps_per_epoch else 1
    state, metrics = train_fn(state, epoch_inputs[step // batches.steps_per_epoch], call)
    step += call
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  return {'images_per_second': total_steps * config.batch_size / seconds, 'accuracy': None}


def run(program: str, args) -> dict:
  env = {**os.environ, 'TFDS_DATA_DIR': args.data_dir}
  with tempfile.TemporaryDirectory() as tmp:
    if program == 'jaxmodel':
      command = [sys.executable, '-m', 'jaxmodel.train', f'--config={args.config}',
                 f'--workdir={tmp}/run', f'--config.data_dir={args.data_dir}',
                 *[f'--config.{setting}' for setting in args.set]]
    elif program == 'pytorch':
      command = [sys.executable, os.path.join(HERE, 'torch_tutorial.py'),
                 f'--data_dir={args.data_dir}', f'--out={tmp}/torch.json']
    else:
      command = [sys.executable, os.path.abspath(__file__), '--worker', f'--config={args.config}',
                 f'--data_dir={args.data_dir}', *[f'--set={setting}' for setting in args.set]]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
      sys.stderr.write(done.stderr[-3000:])
      raise SystemExit(f'{program} failed (exit {done.returncode}): {shlex.join(command)}')
    if program == 'jaxmodel':
      with open(f'{tmp}/run/summary.json') as f:
        summary = json.load(f)
      return {'images_per_second': summary['train_images_per_second'],
              'accuracy': summary['eval_accuracy']}
    if program == 'pytorch':
      with open(f'{tmp}/torch.json') as f:
        summary = json.load(f)
      return {'images_per_second': summary['images_per_s'],
              'accuracy': summary['final_val_accuracy']}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
  rate = lambda r: statistics.median(x['images_per_second'] for x in r)
  lines = ['| program | images/s median (min-max) | vs PyTorch | validation accuracy |',
           '|---|---:|---:|---:|']
  for program, runs in results.items():
    values = [r['images_per_second'] for r in runs]
    ratio = f'{rate(runs) / rate(results["pytorch"]):.2f}x' if results.get('pytorch') else '-'
    accuracies = sorted({f'{r["accuracy"]:.2%}' for r in runs if r['accuracy'] is not None})
    lines.append(f'| {program} | {rate(runs):,.0f} ({min(values):,.0f}-{max(values):,.0f}) '
                 f'| {ratio} | {", ".join(accuracies) or "-"} |')
  if results.get('jaxmodel') and results.get('bare'):
    lines.append(f'\njaxmodel loop / bare steps: {rate(results["jaxmodel"]) / rate(results["bare"]):.2f}')
  return '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR'), required=False)
  parser.add_argument('--config', default='seed_tutorial')
  parser.add_argument('--programs', default=','.join(PROGRAMS))
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', help='also append the table and its command to this markdown file')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='a config override for jaxmodel and bare (e.g. num_epochs=1); repeatable')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if not args.data_dir:
    parser.error('give --data_dir (or set TFDS_DATA_DIR): the prepared dataset\'s directory')
  if args.worker:
    print(json.dumps(bare_worker(args.config, args.data_dir, args.set)))
    return
  programs = [p for p in args.programs.split(',') if p]
  if set(programs) - set(PROGRAMS):
    parser.error(f'--programs takes some of {",".join(PROGRAMS)}')
  results = {p: [] for p in programs}
  start = time.perf_counter()
  for round_index in range(args.repeats):
    for program in programs:
      results[program].append(run(program, args))
      print(f'round {round_index + 1} {program}: {results[program][-1]["images_per_second"]:,.0f} '
            f'images/s | {time.perf_counter() - start:.0f} s so far', file=sys.stderr, flush=True)
  text = table(results)
  print(text)
  if args.out:
    command = shlex.join(['python', 'scripts/recipe_benchmark.py', *(argv or sys.argv[1:])])
    sys.path.insert(0, HERE)
    import benchmark  # scripts/benchmark.py: the commit's and the machine's descriptions
    with open(args.out, 'a') as f:
      f.write(f'\n`{command}` ({time.strftime("%Y-%m-%d %H:%M")}, '
              f'{time.perf_counter() - start:.0f} s; commit {benchmark.commit()}; {benchmark.machine()}):'
              f'\n\n{text}\n')


if __name__ == '__main__':
  main()
