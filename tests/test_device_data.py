"""Device-resident data: batches are pure functions of the step, epochs are permutations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodel import device_data

N, BATCH = 40, 8


def _arrays(n=N):
  # Example i has every pixel equal to i and a left half brighter than its right half.
  images = np.zeros((n, 4, 4, 1), np.uint8) + np.arange(n, dtype=np.uint8)[:, None, None, None]
  images[:, :, :2] += 100
  return {'image': jnp.asarray(images), 'label': jnp.arange(n, dtype=jnp.int32)}


def _batches(batches, arrays, steps):
  batch = jax.jit(batches.batch)
  out = []
  for step in steps:
    permutation = batches.permutation(step // batches.steps_per_epoch)
    out.append(jax.device_get(batch(arrays, permutation, jnp.int32(step))))
  return out


IDENTITY = device_data.Augment(mean=(0.0,), std=(1 / 255,))


def test_each_epoch_is_a_fresh_permutation_of_the_split():
  batches = device_data.TrainBatches(N, BATCH, seed=0, augment=IDENTITY)
  out = _batches(batches, _arrays(), range(10))
  epoch1 = np.concatenate([b['label'] for b in out[:5]])
  epoch2 = np.concatenate([b['label'] for b in out[5:]])
  assert sorted(epoch1) == sorted(epoch2) == list(range(N))
  assert not np.array_equal(epoch1, epoch2)
  for b in out:  # images travel with their labels
    chex.assert_trees_all_equal(b['image'][:, 0, 3, 0], b['label'].astype(np.float32))


def test_a_batch_depends_only_on_seed_and_step():
  arrays = _arrays()
  batches = device_data.TrainBatches(N, BATCH, seed=3, augment=IDENTITY)
  run = _batches(batches, arrays, range(12))
  resumed = _batches(batches, arrays, range(7, 12))  # as a run resumed at step 7 would ask
  chex.assert_trees_all_equal(run[7:], resumed)
  other = _batches(device_data.TrainBatches(N, BATCH, seed=4, augment=IDENTITY), arrays, range(5))
  assert not all(np.array_equal(a['label'], b['label']) for a, b in zip(run, other))


def test_crop_translates_within_the_padding_and_normalizes():
  augment = device_data.Augment(mean=(0.5,), std=(0.25,), crop_padding=1, pad_mode='reflect')
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 6, 6, 1), np.uint8))
  out = augment(images, jnp.arange(16), jnp.int32(0), jnp.int32(0), jax.random.key(0))
  chex.assert_shape(out, (16, 6, 6, 1))
  raw = np.asarray(out) * 0.25 * 255 + 0.5 * 255
  padded = np.pad(np.asarray(images), ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  for i in range(16):  # each output is one of the 9 crops of its reflect-padded image
    crops = [padded[i, dy:dy + 6, dx:dx + 6] for dy in range(3) for dx in range(3)]
    assert any(np.allclose(raw[i], c, atol=1e-3) for c in crops)
  assert len({tuple(np.round(raw[i, 0, :, 0])) for i in range(16)}) > 1


def test_alternating_flip_inverts_each_example_every_other_epoch():
  augment = device_data.Augment(mean=(0.0,), std=(1 / 255,), flip=True, alternating_flip=True)
  batches = device_data.TrainBatches(N, BATCH, seed=0, augment=augment)
  out = _batches(batches, _arrays(), range(15))  # three epochs
  flipped = {}
  for step, b in enumerate(out):
    for label, image in zip(b['label'], b['image']):
      flipped.setdefault(int(label), []).append(bool(image[0, 0, 0] < image[0, 3, 0]))
  assert all(f[0] != f[1] and f[0] == f[2] for f in flipped.values())
  firsts = [f[0] for f in flipped.values()]
  assert 0 < sum(firsts) < N  # the first flip is random per example


def test_eval_batches_cover_every_example_once_with_a_mask():
  arrays = jax.device_get(_arrays(23))  # eval arrays stay on the host
  batches = list(device_data.eval_batches(arrays, IDENTITY, 10))
  assert len(batches) == 3
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])[mask]
  assert list(labels) == list(range(23))
  chex.assert_shape(batches[-1]['image'], (10, 4, 4, 1))


def test_steps_per_call_are_the_same_steps():
  """K steps in one call (a scan) take the same batches, crops, flips and dropout as K calls."""
  import optax
  from jaxmodel import create_train_state, get_model, parallel

  arrays = {'image': jnp.asarray(np.random.default_rng(0).integers(0, 255, (N, 8, 8, 3), np.uint8)),
            'label': jnp.arange(N, dtype=jnp.int32) % 10}
  augment = device_data.Augment(mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=2, flip=True)
  batches = device_data.TrainBatches(N, BATCH, seed=0, augment=augment)
  mesh = parallel.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  state = create_train_state(get_model('mlp', hidden=(32,), dropout=0.2), optax.sgd(0.1, 0.9),
                             jnp.zeros((BATCH, 8, 8, 3)), jax.random.PRNGKey(0))
  inputs = next(device_data.StepInputs(batches, arrays, 0))
  train_fn, _ = parallel.compile_steps('jit', mesh, state, inputs, batches.from_inputs, 3)
  one_by_one, metrics = jax.tree.map(jnp.copy, state), []
  for _ in range(3):
    one_by_one, m = train_fn(one_by_one, inputs)
    metrics.append(m)
  three, stacked = train_fn(jax.tree.map(jnp.copy, state), inputs, 3)
  chex.assert_trees_all_close(three, one_by_one, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(stacked, jax.tree.map(lambda *m: jnp.stack(m), *metrics),
                              rtol=1e-5, atol=1e-6)
  assert int(three.step) == 3
  with pytest.raises(parallel.ParallelError, match='1 or 3'):
    train_fn(three, inputs, 2)


def test_a_run_on_device_data_resumes_to_the_same_model(cifar_small, tmp_path):
  """The CLI with data.on_device: it learns, and a run resumed from a mid-run checkpoint ends
  bitwise where the uninterrupted one did (the step number is the whole data position). Run 3
  steps per call (so some calls run one, to land on checkpoints and epoch ends), it trains the
  same model."""
  import json, os, shutil, subprocess, sys
  import orbax.checkpoint as ocp

  def train(workdir, *overrides):
    command = [
        sys.executable, '-m', 'jaxmodel.train', '--config=cifar', f'--workdir={workdir}',
        f'--config.dataset={cifar_small["name"]}', f'--config.data_dir={cifar_small["data_dir"]}',
        '--config.train_split=train[:80%]', '--config.eval_split=train[80%:]',
        '--config.model.widths=(16, 32, 64)', '--config.batch_size=50', '--config.num_epochs=2',
        '--config.checkpoint_every_steps=8', '--config.keep_checkpoints=10',
        '--config.data.on_device=True', '--config.data.alternating_flip=True',
        '--config.data.pad_mode=reflect', '--config.log_every_steps=4', *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout

  workdir = tmp_path / 'run'
  train(workdir)
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  losses = [r['train_loss'] for r in records if 'train_loss' in r]
  assert losses[-1] < losses[0]
  interrupted = tmp_path / 'interrupted'
  shutil.copytree(workdir, interrupted)
  for step in ('24', '32'):  # as if it had died after the step-16 checkpoint
    shutil.rmtree(interrupted / 'checkpoints' / step)
  stdout = train(interrupted)
  assert 'at step 16' in stdout
  final = lambda w: ocp.StandardCheckpointer().restore(w / 'checkpoints' / '32' / 'state')
  chex.assert_trees_all_equal(final(interrupted), final(workdir))

  batched = tmp_path / 'three_per_call'
  train(batched, '--config.steps_per_dispatch=3', '--config.eval_tta=flip_translate',
        '--config.accuracy_marks=(0.05, 0.99)')
  logged = lambda w: [(r['step'], r['train_loss']) for r in map(json.loads, open(w / 'metrics.jsonl'))
                      if 'train_loss' in r]
  assert [s for s, _ in logged(batched)] == [s for s, _ in logged(workdir)] == list(range(4, 33, 4))
  # The same steps, compiled into another program: float rounding differs and grows a little
  # over 32 steps at this learning rate (test_steps_per_call_are_the_same_steps checks 3 tightly).
  np.testing.assert_allclose([l for _, l in logged(batched)], [l for _, l in logged(workdir)],
                             rtol=1e-2)
  # Evaluated with test-time augmentation, and timed to accuracy marks: reached, not reached.
  summary = json.load(open(batched / 'summary.json'))
  plain = json.load(open(workdir / 'summary.json'))
  assert summary['eval_loss'] != plain['eval_loss']
  reached = summary['seconds_to_accuracy']
  assert 0 < reached['0.05'] <= summary['wall_seconds'] and reached['0.99'] is None
