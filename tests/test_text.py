"""Character-level language modelling: text datasets, windows, overfitting a tiny text, sampling
with a KV cache, and the prepare_text -> train -> generate command lines."""

import json
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from jaxmodel import create_train_state, generate, get_model, text, train_step
from jaxmodel.prepare import PrepareError
from jaxmodel.prepare_text import prepare_text

# Local text, not downloaded: this repository's own source.
SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'jaxmodel',
                      'train.py')


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  first = tmp_path_factory.mktemp('src') / 'a.txt'
  first.write_text('héllo\n' * 50)
  summary = prepare_text([str(first), SOURCE], 'local_text', data_dir, chunk_size=1000)
  return summary, data_dir, first.read_text() + open(SOURCE).read()


def test_prepare_text_splits_chunks_and_stores_the_vocabulary(prepared):
  summary, data_dir, content = prepared
  train = tfds.data_source('local_text', split='train', data_dir=data_dir)
  validation = tfds.data_source('local_text', split='validation', data_dir=data_dir)
  assert len(train) == math.ceil(summary['splits']['train'] / 1000)  # chunks: slices select text
  assert text.read_text(train) + text.read_text(validation) == content  # in order, nothing lost
  assert summary['splits']['validation'] == int(len(content) * 0.1)
  info = tfds.builder('local_text', data_dir=data_dir).info
  assert text.is_text(info)
  assert info.metadata['vocabulary'] == ''.join(sorted(set(content))) and 'é' in content


def test_prepare_text_refuses_bad_input(prepared, tmp_path):
  _, data_dir, _ = prepared
  binary = tmp_path / 'x.bin'
  binary.write_bytes(b'\xff\xfe\x00abc')
  with pytest.raises(PrepareError, match='is not UTF-8 text'):
    prepare_text([str(binary)], 'other', str(tmp_path))
  with pytest.raises(PrepareError, match='already exists'):
    prepare_text([SOURCE], 'local_text', data_dir)
  with pytest.raises(PrepareError, match='built-in TFDS dataset'):
    prepare_text([SOURCE], 'tiny_shakespeare', str(tmp_path))
  with pytest.raises(PrepareError, match='too few'):
    prepare_text([SOURCE], 'short', str(tmp_path), validation_fraction=1e-9)


def test_windows_predict_each_next_character_once():
  ids = np.arange(23, dtype=np.int32)
  windows = text.CharWindows(ids, block_size=5)
  assert len(windows) == 4  # (23 - 1) // 5
  tokens = np.concatenate([windows[i]['tokens'] for i in range(4)])
  labels = np.concatenate([windows[i]['label'] for i in range(4)])
  np.testing.assert_array_equal(tokens, ids[:20])
  np.testing.assert_array_equal(labels, ids[1:21])  # each target once, the next id
  with pytest.raises(IndexError):
    windows[4]


def test_catalog_tiny_shakespeare_layout_reads_as_windows():
  # TFDS's tiny_shakespeare: one 'text' example per split, no vocabulary in its metadata.
  with tfds.testing.mock_data(num_examples=2):
    train = tfds.data_source('tiny_shakespeare', split='train')
    validation = tfds.data_source('tiny_shakespeare', split='validation')
    info = tfds.builder('tiny_shakespeare').info
    windows, eval_windows, vocab = text.char_windows(train, validation, info, block_size=4)
  assert text.is_text(info)
  assert vocab == ''.join(sorted(set(text.read_text(train) + text.read_text(validation))))
  assert len(windows) > 0 and len(eval_windows) > 0


def test_encode_names_characters_outside_the_vocabulary():
  np.testing.assert_array_equal(text.encode('cab', 'abc'), [2, 0, 1])
  assert text.decode([2, 0, 1], 'abc') == 'cab'
  with pytest.raises(ValueError, match=r"1 character\(s\) are not in the vocabulary: 'z'"):
    text.encode('abz', 'abc')


TINY = 'the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.'


def _tiny_lm(block_size=16, dropout=0.0):
  vocab = ''.join(sorted(set(TINY)))
  model = get_model('gpt', vocab_size=len(vocab), block_size=block_size, width=48, depth=2,
                    num_heads=4, dropout=dropout)
  return model, vocab


def test_the_language_model_overfits_a_tiny_text():
  model, vocab = _tiny_lm()
  windows = text.CharWindows(text.encode(TINY, vocab), 16)
  batch = {k: jnp.stack([windows[i][k] for i in range(len(windows))]) for k in ('tokens', 'label')}
  state = create_train_state(model, optax.adam(1e-2), batch['tokens'], jax.random.PRNGKey(0))

  @jax.jit
  def steps(state):
    return jax.lax.scan(lambda s, _: train_step(s, batch), state, None, length=150)

  state, metrics = steps(state)
  assert float(metrics['loss'][0]) > 2.5  # about ln(vocab size) at the start
  assert float(metrics['loss'][-1]) < 0.05
  assert float(metrics['accuracy'][-1]) == 1.0


@pytest.fixture(scope='module')
def trained_lm():
  model, vocab = _tiny_lm()
  windows = text.CharWindows(text.encode(TINY, vocab), 16)
  batch = {k: jnp.stack([windows[i][k] for i in range(len(windows))]) for k in ('tokens', 'label')}
  state = create_train_state(model, optax.adam(1e-2), batch['tokens'], jax.random.PRNGKey(0))
  state, _ = jax.jit(lambda s: jax.lax.scan(lambda s, _: train_step(s, batch), s, None,
                                            length=60))(state)
  return model.clone(decode=True), state.params, vocab


def test_generation_is_deterministic_for_a_seed_and_fills_at_most_the_block(trained_lm):
  model, params, vocab = trained_lm
  a = generate.generate(model, params, vocab, 'the ', max_new_tokens=8, seed=3)
  assert a == generate.generate(model, params, vocab, 'the ', max_new_tokens=8, seed=3)
  assert len(a) == 8 and set(a) <= set(vocab)
  others = {generate.generate(model, params, vocab, 'the ', max_new_tokens=8, seed=s,
                              temperature=2.0) for s in range(4)}
  assert len(others) > 1  # the seed matters
  assert len(generate.generate(model, params, vocab, 'the ')) == 16 - 4  # default: fill the block
  with pytest.raises(generate.GenerateError, match=r'must be in \[1, 12\]'):
    generate.generate(model, params, vocab, 'the ', max_new_tokens=13)
  with pytest.raises(generate.GenerateError, match='at most 16'):
    generate.generate(model, params, vocab, TINY[:16])
  with pytest.raises(generate.GenerateError, match="not in the vocabulary: 'Z'"):
    generate.generate(model, params, vocab, 'Zebra')


def test_greedy_cached_sampling_equals_argmax_of_the_full_forward_pass(trained_lm):
  model, params, vocab = trained_lm
  prompt = 'pack my'
  new = generate.generate(model, params, vocab, prompt, max_new_tokens=6, temperature=0.0)
  full_model = model.clone(decode=False)
  forward = jax.jit(lambda ids: full_model.apply({'params': params}, ids))
  ids = list(text.encode(prompt, vocab))
  for _ in range(6):  # recompute everything each time, no cache; causal: the padding is unseen
    logits = forward(jnp.asarray([ids + [0] * (16 - len(ids))]))
    ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
  assert new == text.decode(ids[len(prompt):], vocab)


def test_top_k_1_is_greedy(trained_lm):
  model, params, vocab = trained_lm
  greedy = generate.generate(model, params, vocab, 'the', max_new_tokens=6, temperature=0.0)
  assert generate.generate(model, params, vocab, 'the', max_new_tokens=6, top_k=1,
                           seed=7) == greedy


def test_prepare_train_generate_command_lines(tmp_path, capsys):
  from jaxmodel import prepare_text as prepare_text_cli
  data_dir, workdir = tmp_path / 'tfds', tmp_path / 'run'
  assert prepare_text_cli.main([SOURCE, '--name', 'cli_text', '--data_dir', str(data_dir)]) == 0
  assert 'vocabulary of' in capsys.readouterr().out
  # Training runs as its own process, as a user runs it.
  train = lambda *extra: subprocess.run(
      [sys.executable, '-m', 'jaxmodel.train', '--config=char_lm', f'--workdir={workdir}',
       '--config.dataset=cli_text', f'--config.data_dir={data_dir}', '--config.model.width=32',
       '--config.model.depth=1', '--config.model.num_heads=2', '--config.model.block_size=32',
       '--config.batch_size=16', '--config.num_epochs=1', '--config.eval_batch_size=16',
       '--config.compilation_cache=False', *extra],
      capture_output=True, text=True, timeout=600, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  refused = train('--config.data.in_memory=True')  # decoded images only
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines() == [
      'error: data.in_memory holds decoded image splits; text is read as it is: set '
      '--config.data.in_memory=False']
  result = train()
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.load(open(workdir / 'summary.json'))
  np.testing.assert_allclose(summary['eval_bits_per_character'], summary['eval_loss'] / math.log(2))
  assert summary['eval_examples'] % 32 == 0  # positions of whole windows, each counted once
  assert f'{summary["eval_bits_per_character"]:.3f} bits per character' in result.stdout
  assert text.load_vocabulary(str(workdir)) == ''.join(sorted(set(open(SOURCE).read())))

  def sample(*args):
    code = generate.main([f'--workdir={workdir}', *args])
    out, err = capsys.readouterr()
    return code, out, err

  first, again = (sample('--prompt=def ', '--max_new_tokens=20', '--seed=1', '--top_k=5')
                  for _ in range(2))
  assert first[0] == 0 and first == again and first[1].startswith('def ')
  assert len(first[1]) == len('def ') + 20 + 1  # and print's newline
  code, _, err = sample('--prompt=\u00e9t\u00e9')
  assert code == 2 and err.startswith('error: --prompt:') and len(err.strip().splitlines()) == 1
  code = generate.main([f'--workdir={tmp_path / "none"}', '--prompt=a'])
  assert code == 2 and 'holds no run' in capsys.readouterr().err
  assert not (tmp_path / 'none').exists()  # nothing created for a wrong workdir
