"""Character-level text for language models: a vocabulary and fixed-length training windows.

A text dataset is a TFDS dataset whose examples hold a 'text' string: `tiny_shakespeare` from
the TFDS catalog (one example per split), or one written from local files by
`python -m jaxmodel.prepare_text` in the same layout, with its vocabulary in the metadata.
A split's text is cut into consecutive windows of block_size + 1 characters that overlap by one,
so each character is predicted exactly once per epoch: a window's first block_size characters are
the model's 'tokens', its last block_size the 'label' (the next character at each position).
"""

import json
import os
from typing import Any, Sequence

import numpy as np

VOCABULARY_FILE = 'vocabulary.json'  # in a workdir: what `jaxmodel.generate` decodes with


def is_text(info: Any) -> bool:
  """Whether the dataset of this tfds DatasetInfo holds text (rather than labelled images)."""
  return 'text' in info.features and 'image' not in info.features


def read_text(source: Any) -> str:
  """All of a split's text, its examples joined in order."""
  texts = (source[i]['text'] for i in range(len(source)))
  return ''.join(t.decode('utf-8') if isinstance(t, bytes) else str(t) for t in texts)


def vocabulary(info: Any, texts: Sequence[str]) -> str:
  """The dataset's characters in id order: from its metadata, else every character of `texts`."""
  stored = (info.metadata or {}).get('vocabulary')
  return stored if stored else ''.join(sorted(set(''.join(texts))))


def encode(text: str, vocab: str) -> np.ndarray:
  """Character ids of `text`; a ValueError names characters outside `vocab`."""
  index = {c: i for i, c in enumerate(vocab)}
  unknown = sorted(set(text) - index.keys())
  if unknown:
    shown = ''.join(unknown[:10])
    raise ValueError(f'{len(unknown)} character(s) are not in the vocabulary: {shown!r}; the '
                     f'vocabulary has {len(vocab)} characters: {vocab[:80]!r}')
  return np.array([index[c] for c in text], np.int32)


def decode(ids: Sequence[int], vocab: str) -> str:
  return ''.join(vocab[int(i)] for i in ids)


class CharWindows:
  """Random-access windows of a text's character ids: {'tokens': (T,), 'label': (T,)}."""

  def __init__(self, ids: np.ndarray, block_size: int):
    self.ids, self.block_size = ids, block_size

  def __len__(self) -> int:
    return max(len(self.ids) - 1, 0) // self.block_size

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < len(self):
      raise IndexError(i)
    window = self.ids[i * self.block_size:(i + 1) * self.block_size + 1]
    return {'tokens': window[:-1], 'label': window[1:]}


def char_windows(train_source: Any, eval_source: Any, info: Any,
                 block_size: int) -> tuple[CharWindows, CharWindows, str]:
  """The train and eval splits as CharWindows, and the vocabulary they are encoded with."""
  train_text, eval_text = read_text(train_source), read_text(eval_source)
  vocab = vocabulary(info, [train_text, eval_text])
  return (CharWindows(encode(train_text, vocab), block_size),
          CharWindows(encode(eval_text, vocab), block_size), vocab)


def as_arrays(example: dict) -> dict:
  """A window as int32 arrays (the `decode` step of the data pipelines)."""
  return {k: np.asarray(v, np.int32) for k, v in example.items()}


class Tokens:
  """The text pipelines' preprocessing: none (no augmentation, no normalization)."""

  def train(self, batch: dict, rng: np.random.Generator) -> dict:
    del rng
    return batch

  def eval(self, batch: dict) -> dict:
    return batch


def save_vocabulary(workdir: str, vocab: str) -> None:
  with open(os.path.join(workdir, VOCABULARY_FILE), 'w') as f:
    json.dump({'vocabulary': vocab}, f)


def load_vocabulary(workdir: str) -> str:
  with open(os.path.join(workdir, VOCABULARY_FILE)) as f:
    return json.load(f)['vocabulary']
