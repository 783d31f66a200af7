"""Where a model's train step spends its time on this backend: XLA's per-operation timings.

  python scripts/profile_step.py --model seed_cnn --batch_size 128 [--steps 20] [--top 25]

Builds the step as scripts/benchmark.py does (the config's model and optimizer, one fixed random
batch), runs it untraced a few times, then traces --steps steps with jax.profiler and reads the
trace in-process (jax.profiler.ProfileData, no TensorBoard needed). The table lists each
operation of the compiled step (a fusion, a oneDNN convolution `ffi_call.N`, a copy, ...) with
its time per step (median over the steps), its result's shape, what it computes (a fusion's root
instruction) and the JAX operation it came from.
XLA runs independent operations concurrently on its threads, so the times add up to more than
the step's wall time, which is printed too. Like `jaxmodel.train`, the process runs with huge
pages for malloc (jaxmodel/memory.py). Run it alone on the machine.
"""

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (scripts/ is not a package)


def hlo_summaries(hlo_text: str, width: int = 100) -> dict[str, str]:
  """Each instruction of the compiled module: name -> 'SHAPE OP  SOURCE', where OP is what it
  computes (a fusion's root instruction, a custom call's target) and SOURCE the JAX operation it
  came from (its metadata's op_name)."""
  lines = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (.*)', line)
    if match:
      lines[match.group(1)] = match.group(2)
  # Each computation's root instruction, from its body (its header line to the closing '}').
  roots = {name: re.search(r'^\s*ROOT %?[\w.\-]+ = (.*)$', body, re.M)
           for name, body in re.findall(r'^%?([\w.\-]+) \([^\n]*\{\n(.*?)^\}$', hlo_text,
                                        re.M | re.S)}
  operation = lambda rhs: (re.match(r'\S+ ([\w\-]+)', rhs) or re.match('()', '')).group(1)
  summaries = {}
  for name, rhs in lines.items():
    shape = re.sub(r'\{[\d,]*\}', '', rhs.split(' ')[0])
    op = operation(rhs)
    called = re.search(r'calls=%?([\w.\-]+)', rhs)
    if op == 'fusion' and called and roots.get(called.group(1)):
      op = 'fusion: ' + operation(roots[called.group(1)].group(1))
    target = re.search(r'custom_call_target="([^"]+)"', rhs)
    if target:
      op = target.group(1)
    source = re.search(r'op_name="(?:jit\(\w+\)/)?([^"]+)"', rhs)
    if op.startswith('fusion: '):
      source = re.search(r'op_name="(?:jit\(\w+\)/)?([^"]+)"', roots[called.group(1)].group(1))
    summaries[name] = f'{shape} {op}  {source.group(1) if source else ""}'[:width]
  return summaries


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='seed_cnn', choices=sorted(benchmark.CONFIGS))
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--top', type=int, default=25)
  args = parser.parse_args(argv)

  from jaxmodel import memory
  memory.use_huge_pages()
  import jax

  compiled, state, batch, _ = benchmark.jax_step(benchmark.model_spec(args.model),
                                                 args.batch_size)
  for _ in range(5):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)

  with tempfile.TemporaryDirectory(prefix='profile_step-') as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(args.steps):
      state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    wall = (time.perf_counter() - start) / args.steps
    jax.profiler.stop_trace()
    path, = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
  per_run = collections.defaultdict(lambda: collections.defaultdict(float))
  for line in profile.find_plane_with_name('/host:CPU').lines:
    for event in line.events:
      stats = dict(event.stats)
      if stats.get('hlo_module') == 'jit_train_step' and 'hlo_op' in stats:
        per_run[stats['run_id']][stats['hlo_op']] += event.duration_ns / 1e6
  runs = list(per_run.values())
  ops = {op for run in runs for op in run}
  median_ms = {op: statistics.median(run.get(op, 0.0) for run in runs) for op in ops}
  summaries = hlo_summaries(compiled.as_text())

  print(f'{args.model} at batch {args.batch_size}: {wall * 1e3:.2f} ms per step (wall, '
        f'{args.steps} traced steps, {len(runs)} with timings); operations add up to '
        f'{sum(median_ms.values()):.2f} ms')
  print(f'{"ms/step":>8}  {"operation":<28} result, what it computes, from which JAX operation')
  for op, ms in sorted(median_ms.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f'{ms:8.3f}  {op:<28} {summaries.get(op, "")}')


if __name__ == '__main__':
  main()
