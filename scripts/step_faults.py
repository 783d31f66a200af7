"""Page faults, system time and wall time per call of one model's train step, in this process.

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python scripts/step_faults.py --model airbench94 \
      --batch_size 128 [--steps 5]                                   # huge pages on
  python scripts/step_faults.py --model airbench94 --batch_size 128   # off

The step is built as scripts/benchmark.py builds it. jaxmodel's programs restart themselves with
huge pages for malloc (jaxmodel/memory.py); this script does not, so that on and off can be
compared: run the two commands alternately, one at a time, and compare per pair.
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (scripts/ is not a package)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='airbench94', choices=sorted(benchmark.CONFIGS))
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--steps', type=int, default=5, help='timed, after 3 untimed')
  args = parser.parse_args(argv)

  import jax
  compiled, state, batch, _ = benchmark.jax_step(benchmark.model_spec(args.model),
                                                 args.batch_size)
  for _ in range(3):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(args.steps):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
  per_step = lambda name: (getattr(after, name) - getattr(before, name)) / args.steps
  print(f'{args.model} batch {args.batch_size}, GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES")}:'
        f' {seconds / args.steps * 1000:.1f} ms/step, {per_step("ru_minflt"):,.0f} minor page '
        f'faults/step, system {per_step("ru_stime") * 1000:.0f} ms/step, user '
        f'{per_step("ru_utime") * 1000:.0f} ms/step')


if __name__ == '__main__':
  main()
