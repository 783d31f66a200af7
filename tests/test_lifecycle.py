"""After training: evaluate, predict, export, fine-tune, early stopping, best checkpoints, plots,
TensorBoard and the profiler, on one tiny run trained on real CIFAR-10 images."""

import gzip
import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxmodel import checkpoint, config as config_lib, evaluate, export, metrics, models, optim
from jaxmodel import predict, trained
from jaxmodel.steps import create_train_state

STEPS_PER_EPOCH, EPOCHS = 16, 2  # 800 train images in batches of 50
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}


def _train(dataset, data_dir, workdir, *extra):
  command = [
      # The tutorial CNN compiles in half the time of the cifar config's net.
      sys.executable, '-m', 'jaxmodel.train', '--config=seed_tutorial', f'--workdir={workdir}',
      f'--config.dataset={dataset}', f'--config.data_dir={data_dir}', '--config.batch_size=50',
      '--config.eval_batch_size=100', '--config.optimizer.learning_rate=0.01', *extra]
  result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout + result.stderr


@pytest.fixture(scope='module')
def run(cifar_small, tmp_path_factory):
  """A finished tiny run: checkpoints every 8 steps (half an epoch), so some carry no metric."""
  workdir = str(tmp_path_factory.mktemp('run'))
  stdout = _train(cifar_small['name'], cifar_small['data_dir'], workdir,
                  '--config.train_split=train[:80%]', '--config.eval_split=train[80%:]',
                  f'--config.num_epochs={EPOCHS}', '--config.checkpoint_every_steps=8',
                  '--config.keep_checkpoints=1', '--config.keep_best_checkpoints=1',
                  '--config.profile_steps=2:4')
  return {'workdir': workdir, 'stdout': stdout, **cifar_small}


@pytest.fixture(scope='module')
def model(run):
  return trained.load(run['workdir'])


def _eval_images(run, split='train[80%:]'):
  """The run's 200 validation images (uint8) and labels, read straight from TFDS."""
  import tensorflow_datasets as tfds
  source = tfds.data_source(run['name'], split=split, data_dir=run['data_dir'])
  examples = [source[i] for i in range(len(source))]
  return (np.stack([np.asarray(e['image'], np.uint8) for e in examples]),
          np.asarray([e['label'] for e in examples]))


def _library_logits(model, images, tta=False):
  return np.asarray(model.logits_fn(tta)(model.variables,
                                         jnp.asarray(model.preprocess.normalize(images))))


def _assert_png(path, min_size=(300, 300)):
  with Image.open(path) as image:
    assert image.format == 'PNG'
    assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
    pixels = np.asarray(image.convert('L'), np.float32)
  assert pixels.std() > 5  # something is drawn, not a blank canvas


# Early stopping: the stopping rule alone, on scripted metric sequences.

def test_early_stopping_stops_after_patience_evaluations_without_improvement():
  stopper = metrics.EarlyStopping('accuracy', patience=2)
  decisions = [stopper.update(step, v) for step, v in
               enumerate([0.50, 0.60, 0.55, 0.61, 0.61, 0.60], start=1)]
  assert decisions == [False, False, False, False, False, True]
  assert (stopper.best, stopper.best_step) == (0.61, 4)
  assert stopper.update(7, 0.70)  # once stopped, stays stopped


def test_early_stopping_on_loss_with_min_delta():
  stopper = metrics.EarlyStopping('loss', patience=1, min_delta=0.05)
  assert not stopper.update(1, 2.0)
  assert not stopper.update(2, 1.9)  # improves by 0.1
  assert stopper.update(3, 1.88)  # by 0.02 only: no improvement
  assert stopper.best_step == 2


def test_patience_zero_never_stops():
  stopper = metrics.EarlyStopping('accuracy', patience=0)
  assert not any(stopper.update(s, 0.5 - s / 100) for s in range(20))


def test_read_evaluations_keeps_the_last_record_of_a_step_up_to_a_step(tmp_path):
  lines = [{'step': 10, 'train_loss': 1.0}, {'step': 16, 'eval_accuracy': 0.1, 'eval_loss': 2},
           {'step': 32, 'eval_accuracy': 0.3, 'eval_loss': 1},  # logged, then the run died
           {'step': 32, 'eval_accuracy': 0.2, 'eval_loss': 1},  # the resumed run's record
           {'step': 48, 'eval_accuracy': 0.4, 'eval_loss': 1}]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
  records = metrics.read_evaluations(str(tmp_path), up_to_step=40)
  assert [(r['step'], r['eval_accuracy']) for r in records] == [(16, 0.1), (32, 0.2)]


def test_profile_steps_and_the_new_keys_are_validated():
  assert config_lib.profile_range('10:20') == (10, 20)
  assert config_lib.profile_range('20:10') is None and config_lib.profile_range('x') is None
  for key, value in [('profile_steps', '5'), ('best_metric', 'f1'),
                     ('early_stopping_patience', '-1'), ('keep_best_checkpoints', '-2')]:
    config = config_lib.base_config()
    config_lib.override(config, key, value)
    with pytest.raises(config_lib.ConfigError, match=key):
      config_lib.validate(config)


# Best checkpoints: Orbax keeps the newest N and the best K at once.

def test_manager_keeps_the_newest_and_the_best_by_metric(tmp_path):
  model = models.get_model('mlp', num_classes=2, hidden=(4,))
  state = create_train_state(model, optim.make_optimizer(config_lib.base_config().optimizer, 10),
                             jnp.zeros((1, 2, 2, 1)), jax.random.PRNGKey(0))
  # Evaluations at even steps; the odd steps' checkpoints carry no metric.
  accuracy = {2: 0.5, 4: 0.9, 6: 0.6, 8: 0.7}
  manager = checkpoint.make_manager(str(tmp_path), keep=2, keep_best=1, best_metric='accuracy')
  for step in range(1, 10):
    metric = {'accuracy': accuracy[step], 'loss': 1 - accuracy[step]} if step in accuracy else None
    checkpoint.save(manager, state.replace(step=jnp.asarray(step)), metrics=metric)
    manager.wait_until_finished()
  assert manager.all_steps() == [4, 8, 9]  # best (4), and the newest two
  assert checkpoint.best_step(manager) == 4
  manager.close()
  by_loss = checkpoint.make_manager(str(tmp_path), keep=1, keep_best=1, best_metric='loss')
  assert by_loss.best_step() == 4  # read back from disk, lowest loss


# The run: plots, TensorBoard, profiler, checkpoints.

def test_run_draws_learning_curves(run):
  path = os.path.join(run['workdir'], 'learning_curves.png')
  _assert_png(path, min_size=(800, 300))


def test_tensorboard_events_read_back_with_tensorboard(run):
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(os.path.join(run['workdir'], 'tensorboard'))
  events.Reload()
  assert {'train_loss', 'train_accuracy', 'eval_loss', 'eval_accuracy'} <= set(
      events.Tags()['scalars'])
  records = [json.loads(line) for line in open(os.path.join(run['workdir'], 'metrics.jsonl'))]
  expected = [(r['step'], r['eval_accuracy']) for r in records if 'eval_accuracy' in r]
  read = [(e.step, e.value) for e in events.Scalars('eval_accuracy')]
  assert [s for s, _ in read] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
  np.testing.assert_allclose([v for _, v in read], [v for _, v in expected], rtol=1e-6)


def test_profile_trace_is_written(run):
  root = os.path.join(run['workdir'], 'profile', 'plugins', 'profile')
  (session,) = os.listdir(root)
  files = os.listdir(os.path.join(root, session))
  xplane = [f for f in files if f.endswith('.xplane.pb')]
  assert xplane and all(os.path.getsize(os.path.join(root, session, f)) > 0 for f in xplane)
  with gzip.open(os.path.join(root, session, 'perfetto_trace.json.gz')) as f:
    trace = json.load(f)
  assert trace['traceEvents']


def test_checkpoints_keep_the_newest_and_the_best(run):
  workdir = run['workdir']
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  last = STEPS_PER_EPOCH * EPOCHS
  # Saved at 8, 16 (metric), 24, 32 (metric): the mid-epoch ones are gone but the newest.
  assert steps == sorted({last, summary['best_step']})
  assert summary['stopped_early'] is False


# evaluate

def test_evaluate_reproduces_the_runs_validation(run, capsys):
  assert evaluate.main(['--workdir', run['workdir']]) == 0
  stdout = capsys.readouterr().out
  summary = json.load(open(os.path.join(run['workdir'], 'summary.json')))
  out = os.path.join(run['workdir'], 'evaluations', f'{run["name"]}-train_80%~-step32')
  results = json.load(open(out + '.json'))
  assert results['count'] == 200
  assert results['accuracy'] == pytest.approx(summary['eval_accuracy'], abs=1e-9)
  assert results['loss'] == pytest.approx(summary['eval_loss'], rel=1e-5)
  confusion = np.asarray(results['confusion_matrix'])
  assert confusion.sum() == 200 and np.trace(confusion) / 200 == results['accuracy']
  for i, entry in enumerate(results['per_class'].values()):
    assert entry['count'] == confusion[i].sum()
  assert f'accuracy {results["accuracy"]:.4f}' in stdout and 'confusion matrix' in stdout
  _assert_png(out + '-confusion.png', min_size=(400, 400))


def test_evaluate_an_image_folder_like_the_dataset_with_and_without_tta(run, model, tmp_path,
                                                                        capsys):
  images, labels = _eval_images(run)
  for i, (image, label) in enumerate(zip(images, labels)):
    folder = tmp_path / 'new' / model.class_names[label]
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f'{i}.png')  # PNG: lossless, the same pixels
  (tmp_path / 'new' / 'cat' / 'broken.png').write_bytes(b'not a png')
  assert evaluate.main(['--workdir', run['workdir'], '--image-folder', str(tmp_path / 'new'),
                        '--tta']) == 0
  assert 'skipped' in capsys.readouterr().err
  results = json.load(open(os.path.join(run['workdir'], 'evaluations',
                                        'folder-new-step32-tta.json')))
  assert results['count'] == 200 and results['skipped_files'] == 1 and results['tta']
  # The same answers as the library on the same pixels, with flip TTA.
  predicted = _library_logits(model, images, tta=True).argmax(-1)
  expected = np.zeros((10, 10), int)
  np.add.at(expected, (labels, predicted), 1)
  np.testing.assert_array_equal(results['confusion_matrix'], expected)


def test_tta_averages_the_logits_of_the_image_and_its_mirror(run, model):
  images, _ = _eval_images(run)
  images = images[:8]
  both = _library_logits(model, images, tta=True)
  plain, mirrored = _library_logits(model, images), _library_logits(model, images[:, :, ::-1])
  chex.assert_trees_all_close(both, (plain + mirrored) / 2, atol=1e-5)
  assert not np.allclose(plain, mirrored)


def test_evaluate_refuses_unknown_class_folders(run, tmp_path, capsys):
  (tmp_path / 'zebra').mkdir()
  assert evaluate.main(['--workdir', run['workdir'], '--image-folder', str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error:') and 'zebra' in err and len(err.splitlines()) == 1


# predict

def test_predict_prints_top_k_and_reports_bad_files(run, model, tmp_path, capsys):
  images, _ = _eval_images(run)
  paths = []
  for i in range(2):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(images[i]).save(paths[-1])
  (tmp_path / 'notes.txt').write_text('hello')
  assert predict.main(['--workdir', run['workdir'], '--top-k', '3', paths[0],
                       str(tmp_path / 'notes.txt'), str(tmp_path / 'missing.png'), paths[1]]) == 1
  out, err = capsys.readouterr()
  lines = out.strip().splitlines()
  assert [line.split(':')[0] for line in lines] == paths
  top1 = _library_logits(model, images[:2]).argmax(-1)
  for line, expected in zip(lines, top1):
    names_probs = [item.rsplit(' ', 1) for item in line.split(': ', 1)[1].split(', ')]
    probs = [float(p) for _, p in names_probs]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.001
    assert names_probs[0][0] == model.class_names[expected]
  assert 'notes.txt: not a readable image' in err and 'missing.png: no such file' in err


def test_predict_with_a_missing_checkpoint_is_one_line(run, tmp_path, capsys):
  assert predict.main(['--workdir', run['workdir'], '--checkpoint', '7', 'x.png']) == 2
  err = capsys.readouterr().err.strip()
  assert 'no checkpoint at step 7' in err and len(err.splitlines()) == 1
  assert predict.main(['--workdir', str(tmp_path), 'x.png']) == 2
  assert 'has no config.json' in capsys.readouterr().err


# export

def test_export_gives_the_same_logits_in_a_process_with_only_jax(run, model, tmp_path, capsys):
  out = str(tmp_path / 'model.jax')
  assert export.main(['--workdir', run['workdir'], '--out', out]) == 0
  spec = json.load(open(out + '.json'))
  assert spec['input'] == {'shape': ['batch', 32, 32, 3], 'dtype': 'uint8',
                           'meaning': spec['input']['meaning']}
  assert spec['class_names'] == model.class_names and spec['checkpoint_step'] == 32
  images, _ = _eval_images(run)
  np.save(tmp_path / 'images.npy', images[:7])
  script = textwrap.dedent(f"""
      import sys
      import jax, numpy as np
      exported = jax.export.deserialize(bytearray(open({out!r}, 'rb').read()))
      images = np.load({str(tmp_path / 'images.npy')!r})
      # Two batch sizes through the one artifact: the batch dimension is symbolic.
      logits = np.concatenate([np.asarray(exported.call(images[:5])),
                               np.asarray(exported.call(images[5:]))])
      np.save({str(tmp_path / 'logits.npy')!r}, logits)
      assert not any(m.split('.')[0] in ('jaxmodel', 'flax') for m in sys.modules), 'not only jax'
      """)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          env=ENV, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  logits = np.load(tmp_path / 'logits.npy')
  chex.assert_shape(logits, (7, 10))
  chex.assert_trees_all_close(logits, _library_logits(model, images[:7]), atol=1e-4, rtol=1e-4)
  # An existing artifact is not replaced without --overwrite.
  assert export.main(['--workdir', run['workdir'], '--out', out]) == 2
  assert 'exists' in capsys.readouterr().err


# Fine-tuning on new data, early stopping and its resume

def test_fine_tune_on_new_classes_with_early_stopping(run, tmp_path):
  images, labels = _eval_images(run, 'train')  # ~300 images of the 3 classes
  names = trained.load(run['workdir']).class_names
  for i, (image, label) in enumerate(zip(images, labels)):
    if names[label] in ('airplane', 'cat', 'ship'):
      folder = tmp_path / 'feedback' / 'train' / names[label]
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(folder / f'{i}.png')
  from jaxmodel.prepare import prepare_image_folder
  data_dir = str(tmp_path / 'tfds')
  prepare_image_folder(str(tmp_path / 'feedback'), 'feedback', data_dir)
  workdir = str(tmp_path / 'finetuned')
  # min_delta 1 is an improvement no accuracy can make: the second evaluation stops the run.
  command = ['--config.train_split=train[:80%]', '--config.eval_split=train[80%:]',
             f'--config.init_from={run["workdir"]}', '--config.num_epochs=5',
             '--config.early_stopping_patience=1', '--config.early_stopping_min_delta=1.0']
  stdout = _train('feedback', data_dir, workdir, *command)
  assert (f'initialized from {run["workdir"]}; re-initialized Dense_2/bias, Dense_2/kernel'
          in stdout)
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  steps_per_epoch = summary['step'] // 2
  assert summary['stopped_early'] and summary['best_step'] == steps_per_epoch
  assert f'early stopping at step {summary["step"]}' in stdout


def test_init_from_takes_every_param_but_a_head_of_another_shape(run, model):
  config = trained.read_config(run['workdir'])
  three = models.get_model('seed_cnn', num_classes=3)
  params = three.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))['params']
  new_params, _, fresh = trained.init_from(run['workdir'], config, params, {})
  assert sorted(fresh) == ['Dense_2/bias', 'Dense_2/kernel']
  chex.assert_trees_all_equal(new_params['Dense_2'], params['Dense_2'])
  source = model.variables['params']
  chex.assert_trees_all_equal({k: v for k, v in new_params.items() if k != 'Dense_2'},
                              {k: v for k, v in source.items() if k != 'Dense_2'})
  # A tree with model state (BatchNorm statistics) transfers the same way, path by path.
  new = {'BatchNorm_0': {'mean': jnp.zeros(4), 'var': jnp.ones(4)}, 'head': jnp.zeros(3)}
  old = {'BatchNorm_0': {'mean': jnp.arange(4.0), 'var': jnp.full(4, 2.0)}, 'head': jnp.ones(10)}
  merged, fresh = trained.transfer(new, old)
  chex.assert_trees_all_equal(merged, {'BatchNorm_0': old['BatchNorm_0'], 'head': jnp.zeros(3)})
  assert fresh == ['head']
