"""The airbench94 CIFAR-10 recipe in PyTorch on the CPU: the twin of configs/cifar_speedrun.py.

Re-implemented from ../shared/reference/airbench94.md so that the two programs can be compared
on wall time to reach 85%, 90% and 93% validation accuracy, on the same data and machine.

Method, as airbench94 does it:

- Net (NCHW, float32): a 2x2 "whitening" conv 3 -> 24 (stride --whiten_stride), its weights the
  eigenvectors of the covariance of all 2x2x3 patches of the first 5,000 normalized training
  images scaled by 1 / sqrt(eigenvalue + 5e-4), and their negations; weights frozen, bias
  trained; GELU. Then three groups of --widths: conv 3x3 (no bias; first C_in filters set to
  identity) -> maxpool 2 -> BatchNorm -> GELU -> conv 3x3 -> BatchNorm -> GELU, BatchNorm with its
  scale frozen at 1, eps 1e-12, momentum 0.4 (PyTorch's convention; Flax's 0.6). Head: global
  max pool, linear without bias, times 1/9.
- Training: batch --batch_size, a fresh permutation per epoch, the last partial batch dropped;
  translation by up to 2 pixels (reflect padding) and alternating flips (random per image in
  epoch 0, inverted on odd epochs). Cross-entropy with label smoothing 0.2. Nesterov SGD, momentum
  0.85, L2 weight decay added to the gradient; BatchNorm biases at 64x the learning rate with the
  weight decay divided by 64 (the same decay per step). Per step: linear warm-up 0.2 -> 1 over 23%
  of the steps, then linear decay to 0.07. The whitening bias trains for --whiten_bias_epochs (3),
  then is frozen. Lookahead over all float state (weights and BatchNorm running statistics): every
  5 steps average <- lerp(average, state, 1 - d), state <- average, d = 0.95^5 x
  (step / total_steps)^3, step counted from 1 after each update; after the last step, state <-
  average.
- Evaluation after every epoch (eval mode, batches of 2000): accuracy and test-time-augmented
  accuracy, 0.5 x mean(f(x), f(flip x)) + 0.5 x the mean of f and f o flip on the two 1-pixel
  diagonal translations (reflect padding 1): 6 forward passes.

What differs from airbench94, and why:

- The data and hyperparameters of jaxmodel: TFDS `cifar10_jpeg`, train `train[:90%]` (45,000),
  validation `train[90%:]` (5,000), read with torch_tutorial's `load_split` and held in memory as
  uint8 (airbench: the 50,000 / 10,000 split on the GPU). Integer --epochs (default 10, i.e.
  10 x 43 = 430 steps at batch 1024) instead of 9.9. The loss is the mean over the batch, with
  airbench's lr rescaled for it as in jaxmodel's configs/cifar.py (lr 11.5 / (1 + 1 / (1 - 0.85))
  x batch / 1024, weight decay 0.0153 / 11.5): at batch 1024 the same update as airbench's
  summed loss.
- float32 everywhere and eager PyTorch on the CPU (airbench: half precision outside BatchNorm,
  on a GPU, optionally compiled).
- GELU is the tanh approximation, Flax's nn.gelu default (airbench: the exact GELU).
- Init: PyTorch's default for convs and the head, as airbench (jaxmodel: lecun_normal, 3x the
  variance); the whitening bias starts at 0 (as Flax's).
- Augmentation is drawn per batch (one gather for crop and flip) rather than for the whole
  dataset at the start of each epoch: the same distribution, less memory.
- Timing: the clock covers the whitening init and the training steps, not reading the data nor
  the per-epoch evaluations (airbench times its final TTA evaluation too). Threads: PyTorch's
  default (one per core) unless --threads is given.

  python scripts/torch_speedrun.py --data_dir /tmp/tfds_full --out /tmp/torch_speedrun.json
  python scripts/torch_speedrun.py --data_dir /tmp/tfds_full --max_train 2048 --max_eval 1000 \\
      --batch_size 256 --epochs 2 --widths 16,32,32 --threads 1  # a smoke run
"""

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_tutorial import add_data_arguments, load_split  # noqa: E402  (after the path insert)

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
MARKS = (0.85, 0.90, 0.93)
NUM_CLASSES = 10
WHITEN_SAMPLES = 5000
CROP_PADDING = 2
BIAS_LR_SCALE = 64.0
LOOKAHEAD_EVERY, LOOKAHEAD_BASE, LOOKAHEAD_POWER = 5, 0.95, 3.0


def gelu(x: torch.Tensor) -> torch.Tensor:
  return F.gelu(x, approximate='tanh')  # Flax's default, so the twins compute the same function


def batch_norm(width: int) -> nn.BatchNorm2d:
  norm = nn.BatchNorm2d(width, eps=1e-12, momentum=0.4)
  norm.weight.requires_grad_(False)  # a scale fixed at 1: only the bias learns
  return norm


def dirac_conv(c_in: int, width: int) -> nn.Conv2d:
  """A 3x3 'same' conv with PyTorch's default init, its first C_in filters set to identity."""
  conv = nn.Conv2d(c_in, width, 3, padding=1, bias=False)
  with torch.no_grad():
    nn.init.dirac_(conv.weight[:min(c_in, width)])
  return conv


class ConvGroup(nn.Module):
  """conv, maxpool 2, BatchNorm, GELU, conv, BatchNorm, GELU (Flax-style names, as benchmark.py)."""

  def __init__(self, c_in: int, width: int):
    super().__init__()
    self.Conv_0 = dirac_conv(c_in, width)
    self.BatchNorm_0 = batch_norm(width)
    self.Conv_1 = dirac_conv(width, width)
    self.BatchNorm_1 = batch_norm(width)

  def forward(self, x):
    x = gelu(self.BatchNorm_0(F.max_pool2d(self.Conv_0(x), 2)))
    return gelu(self.BatchNorm_1(self.Conv_1(x)))


class Airbench(nn.Module):
  """The airbench94 net; `whiten.weight` is frozen and meant to be set by `init_whitening`."""

  def __init__(self, widths=(64, 256, 256), whiten_width=24, whiten_stride=1, head_scale=1 / 9):
    super().__init__()
    self.whiten = nn.Conv2d(3, whiten_width, 2, stride=whiten_stride)
    self.whiten.weight.requires_grad_(False)
    with torch.no_grad():
      self.whiten.bias.zero_()
    self.groups = nn.Sequential(*[ConvGroup(c_in, width) for c_in, width
                                  in zip((whiten_width, *widths[:-1]), widths)])
    self.Dense_0 = nn.Linear(widths[-1], NUM_CLASSES, bias=False)
    self.head_scale = head_scale

  def forward(self, x):
    x = self.groups(gelu(self.whiten(x)))
    return self.Dense_0(x.amax(dim=(2, 3))) * self.head_scale


def normalize(images: torch.Tensor) -> torch.Tensor:
  """uint8 NCHW -> float32 standardized per channel."""
  mean = 255 * torch.tensor(MEAN).view(1, 3, 1, 1)
  std = 255 * torch.tensor(STD).view(1, 3, 1, 1)
  return (images.float() - mean) / std


def patch_covariance(images: torch.Tensor) -> torch.Tensor:
  """The covariance (float64, ddof 1) of all 2x2 patches, flattened (c, kh, kw) as OIHW kernels."""
  size = images.shape[1] * 4
  total = torch.zeros(size, dtype=torch.float64)
  outer = torch.zeros(size, size, dtype=torch.float64)
  count = 0
  for chunk in images.split(500):  # chunks bound the memory of the unfolded patches
    patches = F.unfold(chunk.double(), 2).transpose(1, 2).reshape(-1, size)
    total += patches.sum(0)
    outer += patches.T @ patches
    count += len(patches)
  mean = total / count
  return (outer - count * torch.outer(mean, mean)) / (count - 1)


def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
  """Sets `conv.weight` to the patch-whitening filters of `images` and their negations."""
  eigenvalues, eigenvectors = torch.linalg.eigh(patch_covariance(images))
  half = conv.out_channels // 2
  # eigh sorts ascending: the leading components are the last columns.
  filters = eigenvectors.flip(1)[:, :half] / torch.sqrt(eigenvalues.flip(0)[:half] + eps)
  kernel = torch.cat([filters, -filters], dim=1).T
  with torch.no_grad():
    conv.weight.copy_(kernel.reshape(conv.weight.shape).float())


def lr_factor(total_steps: int, warmup_fraction=0.23, init=0.2, final=0.07):
  """jaxmodel's make_schedule('warmup_linear') as step -> fraction of the peak lr."""
  warmup = min(int(round(warmup_fraction * total_steps)), total_steps - 1)
  decay_steps = max(total_steps - warmup, 1)

  def factor(step):
    if step < warmup:
      return init + (1 - init) * step / warmup
    return 1 + (final - 1) * min(step - warmup, decay_steps) / decay_steps
  return factor


def make_optimizer(net: Airbench, lr: float, weight_decay: float, momentum: float,
                   total_steps: int):
  """Nesterov SGD with jaxmodel's groups: BatchNorm biases at 64x lr and weight decay / 64."""
  biases, others = [], []
  for name, param in net.named_parameters():
    if param.requires_grad:  # the whitening kernel and BatchNorm scales are frozen
      (biases if 'BatchNorm' in name and name.endswith('bias') else others).append(param)
  groups = [{'params': others, 'lr': lr, 'weight_decay': weight_decay},
            {'params': biases, 'lr': lr * BIAS_LR_SCALE,
             'weight_decay': weight_decay / BIAS_LR_SCALE}]
  sgd = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
  return sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lr_factor(total_steps))


class Lookahead:
  """airbench's lookahead, counted as jaxmodel's `optim.Lookahead`: after optimizer step
  `count` (1-based), if count % 5 == 0, average <- lerp(average, tensors, 1 - d(count)) and
  tensors <- average. The average starts as the tensors after the whitening init."""

  def __init__(self, tensors: list[torch.Tensor], total_steps: int):
    self.tensors, self.total_steps, self.count = tensors, total_steps, 0
    self.average = [t.detach().clone() for t in tensors]

  @torch.no_grad()
  def step(self) -> None:
    self.count += 1
    if self.count % LOOKAHEAD_EVERY:
      return
    decay = LOOKAHEAD_BASE ** LOOKAHEAD_EVERY * (self.count / self.total_steps) ** LOOKAHEAD_POWER
    for average, tensor in zip(self.average, self.tensors):
      average.lerp_(tensor, 1 - decay)
      tensor.copy_(average)

  @torch.no_grad()
  def finish(self) -> None:
    for average, tensor in zip(self.average, self.tensors):
      tensor.copy_(average)


def reflect(index: torch.Tensor, size: int) -> torch.Tensor:
  """Indices into a length-`size` axis as reflect padding maps them (-1 -> 1, size -> size - 2)."""
  index = index.abs()
  return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def augmented_batch(images: torch.Tensor, indices: torch.Tensor, flips: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
  """Examples `indices` of uint8 `images`, translated by up to 2 pixels (reflect padding) and
  flipped where `flips`, gathered in one indexing op, then normalized."""
  n, (channels, height, width) = len(indices), images.shape[1:]
  shifts = torch.randint(-CROP_PADDING, CROP_PADDING + 1, (n, 2), generator=generator)
  rows = reflect(torch.arange(height) + shifts[:, :1], height)
  columns = torch.arange(width).expand(n, width)
  columns = torch.where(flips[:, None], width - 1 - columns, columns)  # crop, then flip
  columns = reflect(columns + shifts[:, 1:], width)
  batch = images[indices[:, None, None, None], torch.arange(channels)[None, :, None, None],
                 rows[:, None, :, None], columns[:, None, None, :]]
  return normalize(batch)


@torch.inference_mode()
def evaluate(net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 2000) -> tuple[float, float]:
  """Plain and TTA accuracy on normalized `images`, with the running BatchNorm statistics."""
  net.eval()
  correct = correct_tta = 0
  mirrored = lambda x: 0.5 * (net(x) + net(x.flip(-1)))
  for x, y in zip(images.split(batch_size), labels.split(batch_size)):
    plain = net(x)
    padded = F.pad(x, (1, 1, 1, 1), mode='reflect')
    translated = 0.5 * (mirrored(padded[..., :-2, :-2]) + mirrored(padded[..., 2:, 2:]))
    logits = 0.5 * (0.5 * (plain + net(x.flip(-1))) + translated)
    correct += (plain.argmax(1) == y).sum().item()
    correct_tta += (logits.argmax(1) == y).sum().item()
  net.train()
  return correct / len(labels), correct_tta / len(labels)


def head_split(dataset: str, split: str, data_dir: str, count: int) -> str:
  """`split` cut to its first `count` examples (TFDS slicing), so that only those are read."""
  if not count:
    return split
  import tensorflow_datasets as tfds
  info = tfds.builder(dataset, data_dir=data_dir).info
  parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(dict(info.splits))
  if len(parts) != 1:
    return split  # e.g. 'train+test': read it all, `load` cuts it
  part = parts[0]
  start = part.from_ or 0
  stop = info.splits[part.splitname].num_examples if part.to is None else part.to
  return f'{part.splitname}[{start}:{min(stop, start + count)}]'


def read(args, split: str, count: int):
  images, labels = load_split(args.dataset, head_split(args.dataset, split, args.data_dir, count),
                              args.data_dir)
  return (images[:count], labels[:count]) if count else (images, labels)


def load(args) -> tuple[torch.Tensor, ...]:
  """Train images as uint8 NCHW, eval images normalized, labels int64 (--max_train, --max_eval
  take the first examples of each split)."""
  train_x, train_y = read(args, args.train_split, args.max_train)
  eval_x, eval_y = read(args, args.eval_split, args.max_eval)
  to_nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  return (to_nchw(train_x), torch.from_numpy(train_y), normalize(to_nchw(eval_x)),
          torch.from_numpy(eval_y))


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_data_arguments(parser)
  parser.add_argument('--max_train', type=int, default=0, help='first N train images (0: all)')
  parser.add_argument('--max_eval', type=int, default=0,
                      help='first N eval images (0: all); smoke runs, as TTA costs 6 passes')
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--batch_size', type=int, default=1024)
  parser.add_argument('--widths', default='64,256,256')
  parser.add_argument('--whiten_stride', type=int, default=1)
  parser.add_argument('--whiten_bias_epochs', type=int, default=3,
                      help='train the whitening bias for this many epochs, then freeze it '
                           '(0: never frozen); airbench and jaxmodel\'s config: 3 of 10')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--threads', type=int, default=0, help='torch threads (0: PyTorch default)')
  parser.add_argument('--time_limit', type=float, default=0,
                      help='stop after the first epoch that ends past this many seconds of '
                           'training (0: no limit); a mark not reached by then took longer')
  parser.add_argument('--out', help='write a JSON summary here')
  args = parser.parse_args(argv)
  if args.time_limit < 0:
    parser.error(f'--time_limit {args.time_limit:g}: give seconds of training, or 0 for no limit')
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  widths = tuple(int(w) for w in args.widths.split(','))

  start = time.perf_counter()
  train_x, train_y, eval_x, eval_y = load(args)
  load_seconds = time.perf_counter() - start
  n, bs = len(train_y), args.batch_size
  steps_per_epoch = n // bs
  if steps_per_epoch == 0:
    raise SystemExit(f'{n} training images make no full batch of {bs}')
  total_steps = steps_per_epoch * args.epochs
  lr = 11.5 / (1 + 1 / (1 - 0.85)) * bs / 1024  # airbench's, for a mean instead of a summed loss
  weight_decay = 0.0153 / 11.5  # the same decay per step as airbench at batch 1024
  print(f'{args.dataset} {args.train_split} ({n}) -> {args.eval_split} ({len(eval_y)}) read in '
        f'{load_seconds:.1f} s | {steps_per_epoch} steps/epoch x {args.epochs} epochs | '
        f'torch {torch.__version__}, {torch.get_num_threads()} threads', flush=True)

  net = Airbench(widths, whiten_stride=args.whiten_stride)
  generator = torch.Generator().manual_seed(args.seed)
  criterion = nn.CrossEntropyLoss(label_smoothing=0.2)
  history, marks, train_seconds, step = [], {}, 0.0, 0

  start = time.perf_counter()
  init_whitening(net.whiten, normalize(train_x[:WHITEN_SAMPLES]))
  sgd, schedule = make_optimizer(net, lr, weight_decay, 0.85, total_steps)
  lookahead = Lookahead([t for t in net.state_dict().values() if t.is_floating_point()],
                        total_steps)
  first_flips = torch.rand(n, generator=generator) < 0.5  # alternating flip: fixed per image
  whiten_seconds = time.perf_counter() - start
  train_seconds += whiten_seconds

  for epoch in range(args.epochs):
    start = time.perf_counter()
    if args.whiten_bias_epochs and epoch == args.whiten_bias_epochs:
      net.whiten.bias.requires_grad_(False)  # no gradient: SGD then leaves it as it is
    order = torch.randperm(n, generator=generator)
    flips = first_flips ^ (epoch % 2 == 1)
    loss_sum = torch.zeros(())
    for i in range(steps_per_epoch):
      indices = order[i * bs:(i + 1) * bs]
      inputs = augmented_batch(train_x, indices, flips[indices], generator)
      loss = criterion(net(inputs), train_y[indices])
      sgd.zero_grad(set_to_none=True)
      loss.backward()
      sgd.step()
      schedule.step()
      lookahead.step()
      loss_sum += loss.detach()
      step += 1
    if step == total_steps:
      lookahead.finish()
    train_seconds += time.perf_counter() - start

    accuracy, tta_accuracy = evaluate(net, eval_x, eval_y)  # off the clock
    history.append({'epoch': epoch + 1, 'train_seconds': train_seconds,
                    'train_loss': loss_sum.item() / steps_per_epoch, 'accuracy': accuracy,
                    'tta_accuracy': tta_accuracy})
    for mark in MARKS:
      if tta_accuracy >= mark and str(mark) not in marks:
        marks[str(mark)] = train_seconds
    print(f'epoch {epoch + 1}/{args.epochs}: loss {history[-1]["train_loss"]:.4f} | accuracy '
          f'{accuracy:.4f} | TTA {tta_accuracy:.4f} | train {train_seconds:.1f} s', flush=True)
    if args.time_limit and train_seconds > args.time_limit and epoch + 1 < args.epochs:
      print(f'stopped: {train_seconds:.1f} s of training is past --time_limit '
            f'{args.time_limit:g} s', flush=True)
      break

  marks = {str(m): marks.get(str(m)) for m in MARKS}
  images_per_s = step * bs / train_seconds
  summary = {'program': 'scripts/torch_speedrun.py', 'dataset': args.dataset,
             'data_dir': args.data_dir, 'train_split': args.train_split,
             'eval_split': args.eval_split, 'num_train': n, 'num_eval': len(eval_y),
             'epochs': args.epochs, 'epochs_run': len(history), 'batch_size': bs,
             'widths': list(widths), 'whiten_stride': args.whiten_stride,
             'whiten_bias_epochs': args.whiten_bias_epochs,
             'learning_rate': lr, 'weight_decay': weight_decay, 'seed': args.seed,
             'time_limit': args.time_limit, 'steps': step, 'epoch_results': history,
             'seconds_to_tta_accuracy': marks, 'final_val_accuracy': history[-1]['accuracy'],
             'final_val_tta_accuracy': history[-1]['tta_accuracy'],
             'train_seconds': train_seconds, 'whiten_init_seconds': whiten_seconds,
             'images_per_s': images_per_s, 'data_load_seconds': load_seconds,
             'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
             'python': platform.python_version()}
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(summary, f, indent=2)
  missing = 'never' if len(history) == args.epochs else f'not by {train_seconds:.1f} s (stopped)'
  reached = ', '.join(f'{float(m):.0%} ' + (f'{s:.1f} s' if s is not None else missing)
                      for m, s in marks.items())
  print(f'time to TTA accuracy: {reached} | final accuracy {history[-1]["accuracy"]:.4f}, TTA '
        f'{history[-1]["tta_accuracy"]:.4f} | training wall time {train_seconds:.1f} s | '
        f'{images_per_s:.0f} images/s', flush=True)
  return summary


if __name__ == '__main__':
  main()
