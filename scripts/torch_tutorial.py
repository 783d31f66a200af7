"""The PyTorch CIFAR-10 tutorial ("Training a Classifier"), on the data jaxmodel trains on.

The tutorial's program, faithfully: its `Net` (conv 3->6 k5, maxpool 2, conv 6->16 k5, maxpool 2,
fc 400->120->84->10, ReLU), CrossEntropyLoss, SGD lr 0.001 momentum 0.9, batch 4, a fresh
shuffle every epoch, 2 epochs, inputs scaled to [-1, 1] (ToTensor then Normalize(0.5, 0.5)), no
augmentation. What differs, and why:

- Data: the TFDS dataset prepared by `python -m jaxmodel.prepare` (default `cifar10_jpeg`,
  train `train[:90%]`, validation `train[90%:]`: the splits of configs/seed_tutorial.py), read
  once with `tfds.data_source` into uint8 arrays and normalized in memory, instead of
  torchvision's download. Nothing else reads the disk afterwards.
- No DataLoader: each epoch indexes the in-memory tensor with a `torch.randperm` (seeded by
  --seed). For 32x32 images in batches of 4 this is the fastest plain-PyTorch loop; a DataLoader
  would add per-image Python calls and collation to every step. Same sampling as shuffle=True.
- Validation runs once after training, on the eval split in batches of 1000 (the tutorial uses
  batches of 4; the accuracy is the same up to float rounding, as the net has no batch statistics).

Training wall time counts the training loop only (not reading/decoding the data, not the
validation pass). Threads: PyTorch's default (one per core) unless --threads is given.

  python scripts/torch_tutorial.py --data_dir /tmp/tfds_full --out /tmp/torch_tutorial.json
"""

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim


class Net(nn.Module):
  """The tutorial's network, as written there."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 6, 5)
    self.pool = nn.MaxPool2d(2, 2)
    self.conv2 = nn.Conv2d(6, 16, 5)
    self.fc1 = nn.Linear(16 * 5 * 5, 120)
    self.fc2 = nn.Linear(120, 84)
    self.fc3 = nn.Linear(84, 10)

  def forward(self, x):
    x = self.pool(F.relu(self.conv1(x)))
    x = self.pool(F.relu(self.conv2(x)))
    x = torch.flatten(x, 1)
    x = F.relu(self.fc1(x))
    x = F.relu(self.fc2(x))
    return self.fc3(x)


def load_split(name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """All of `name[split]` as uint8 images (N, H, W, C) and int64 labels (N,)."""
  import tensorflow_datasets as tfds  # only for reading; TensorFlow itself is not needed
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  images, labels = [], []
  for start in range(0, len(source), 1000):  # batched reads: far fewer Python calls
    for example in source.__getitems__(list(range(start, min(start + 1000, len(source))))):
      images.append(example['image'])
      labels.append(example['label'])
  return np.stack(images).astype(np.uint8), np.asarray(labels, np.int64)


def to_tensor(images: np.ndarray) -> torch.Tensor:
  """ToTensor + Normalize((0.5,) * 3, (0.5,) * 3) on a whole array: NCHW float in [-1, 1]."""
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
  return x.sub_(0.5).div_(0.5).contiguous()


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
  """The dataset flags, with jaxmodel's defaults (the splits its CIFAR configs train on)."""
  parser.add_argument('--dataset', default='cifar10_jpeg')
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR')
                      or os.path.expanduser('~/tensorflow_datasets'))
  parser.add_argument('--train_split', default='train[:90%]')
  parser.add_argument('--eval_split', default='train[90%:]')


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_data_arguments(parser)
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--batch_size', type=int, default=4)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--threads', type=int, default=0, help='torch threads (0: PyTorch default)')
  parser.add_argument('--out', help='write a JSON summary here')
  args = parser.parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)

  start = time.perf_counter()
  train_x, train_y = load_split(args.dataset, args.train_split, args.data_dir)
  eval_x, eval_y = load_split(args.dataset, args.eval_split, args.data_dir)
  train_x, train_y = to_tensor(train_x), torch.from_numpy(train_y)
  eval_x, eval_y = to_tensor(eval_x), torch.from_numpy(eval_y)
  load_seconds = time.perf_counter() - start
  print(f'{args.dataset} {args.train_split} ({len(train_y)}) -> {args.eval_split} ({len(eval_y)}) '
        f'read in {load_seconds:.1f} s | torch {torch.__version__}, {torch.get_num_threads()} '
        f'threads', flush=True)

  net = Net()
  criterion = nn.CrossEntropyLoss()
  optimizer = optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
  generator = torch.Generator().manual_seed(args.seed)
  n, bs = len(train_y), args.batch_size
  steps, epoch_losses = 0, []
  start = time.perf_counter()
  for epoch in range(args.epochs):
    order = torch.randperm(n, generator=generator)
    running_loss, epoch_loss = 0.0, 0.0
    for i, first in enumerate(range(0, n, bs)):  # the last batch may be partial, as in a DataLoader
      idx = order[first:first + bs]
      inputs, labels = train_x[idx], train_y[idx]
      optimizer.zero_grad()
      outputs = net(inputs)
      loss = criterion(outputs, labels)
      loss.backward()
      optimizer.step()
      value = loss.item()
      running_loss += value
      epoch_loss += value
      steps += 1
      if i % 2000 == 1999:
        print(f'[{epoch + 1}, {i + 1:5d}] loss: {running_loss / 2000:.3f}', flush=True)
        running_loss = 0.0
    epoch_losses.append(epoch_loss / (i + 1))
  train_seconds = time.perf_counter() - start

  correct = 0
  with torch.no_grad():
    for first in range(0, len(eval_y), 1000):
      outputs = net(eval_x[first:first + 1000])
      correct += (outputs.argmax(1) == eval_y[first:first + 1000]).sum().item()
  accuracy = correct / len(eval_y)
  images_per_s = args.epochs * n / train_seconds
  print(f'final validation accuracy {accuracy:.4f} ({correct}/{len(eval_y)}) | training wall time '
        f'{train_seconds:.1f} s | {images_per_s:.0f} images/s', flush=True)

  summary = {'program': 'scripts/torch_tutorial.py', 'dataset': args.dataset,
             'data_dir': args.data_dir, 'train_split': args.train_split,
             'eval_split': args.eval_split, 'num_train': n, 'num_eval': len(eval_y),
             'epochs': args.epochs, 'batch_size': bs, 'seed': args.seed, 'steps': steps,
             'epoch_mean_loss': epoch_losses, 'final_val_accuracy': accuracy,
             'train_seconds': train_seconds, 'images_per_s': images_per_s,
             'data_load_seconds': load_seconds, 'torch': torch.__version__,
             'torch_threads': torch.get_num_threads(), 'python': platform.python_version()}
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(summary, f, indent=2)
  return summary


if __name__ == '__main__':
  main()
