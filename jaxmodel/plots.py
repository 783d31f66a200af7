"""Pictures of a run: learning curves from metrics.jsonl and confusion matrices, as PNG files."""

import json
import os
from typing import Sequence

import matplotlib
matplotlib.use('Agg')  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
  by_step = {r['step']: r[key] for r in records if key in r}  # a resumed run's repeats: last wins
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def learning_curves(workdir: str, out: str | None = None) -> str | None:
  """Draws train and validation loss and accuracy against step into WORKDIR/learning_curves.png;
  returns its path (None when metrics.jsonl holds no record yet)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  if not records:
    return None
  out = out or os.path.join(workdir, 'learning_curves.png')
  figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
  for ax, name in zip(axes, ('loss', 'accuracy')):
    for split, style in (('train', '-'), ('eval', 'o-')):
      steps, values = _series(records, f'{split}_{name}')
      if steps:
        ax.plot(steps, values, style, label='validation' if split == 'eval' else split,
                markersize=4)
    ax.set_xlabel('step')
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend()
  figure.suptitle(os.path.basename(os.path.abspath(workdir)))
  figure.tight_layout()
  figure.savefig(out)
  plt.close(figure)
  return out


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], out: str,
                     title: str = '') -> str:
  """Draws `matrix` (rows: true class, columns: predicted) with its counts into the PNG `out`."""
  n = len(class_names)
  size = max(4.0, 0.55 * n + 2)
  figure, ax = plt.subplots(figsize=(size, size), dpi=100)
  ax.imshow(matrix, cmap='Blues')
  ax.set_xticks(range(n), class_names, rotation=45, ha='right')
  ax.set_yticks(range(n), class_names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  if n <= 30:  # beyond that the numbers are unreadable anyway
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(n):
      for j in range(n):
        ax.text(j, i, int(matrix[i, j]), ha='center', va='center', fontsize=8,
                color='white' if matrix[i, j] > threshold else 'black')
  ax.set_title(title)
  figure.tight_layout()
  figure.savefig(out)
  plt.close(figure)
  return out
