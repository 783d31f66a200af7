"""Configs by name or path, typed overrides, and one-line errors from the command line."""

import os
import subprocess
import sys

import ml_collections
import pytest

from jaxmodel import config as config_lib
from jaxmodel.config import ConfigError


def test_every_bundled_config_loads_and_validates():
  names = config_lib.bundled_config_names()
  assert {'default', 'cifar', 'seed_tutorial'} <= set(names)
  for name in names:
    config = config_lib.load_config(name)
    assert isinstance(config, ml_collections.ConfigDict)
    config_lib.validate(config)


def test_seed_tutorial_is_the_pytorch_recipe():
  config = config_lib.load_config('seed_tutorial')
  assert (config.model.name, config.batch_size, config.num_epochs) == ('seed_cnn', 4, 2)
  assert (config.optimizer.name, config.optimizer.learning_rate, config.optimizer.momentum,
          config.optimizer.schedule, config.optimizer.weight_decay) == ('sgd', 0.001, 0.9,
                                                                        'constant', 0.0)
  assert (config.data.crop_padding, config.data.flip) == (0, False)
  assert config.data.mean == config.data.std == (0.5, 0.5, 0.5)  # pixels to [-1, 1]


def test_overrides_keep_types_and_reach_nested_keys():
  config, spec, workdir, debug = config_lib.parse_command_line([
      '--config=cifar', '--config.batch_size=64', '--config.optimizer.learning_rate=1',
      '--config.model.widths=(8, 16, 32)', '--config.data.flip=false',
      '--config.train_split=train[:50%]', '--config.data_dir=/tmp/x', '--workdir', 'w'])
  assert (spec, workdir, debug) == ('cifar', 'w', False)
  assert config.batch_size == 64
  assert config.optimizer.learning_rate == 1.0
  assert isinstance(config.optimizer.learning_rate, float)
  assert config.model.widths == (8, 16, 32)
  assert config.data.flip is False
  assert config.train_split == 'train[:50%]'
  assert config.data_dir == '/tmp/x'


def test_a_config_file_by_path(tmp_path):
  path = tmp_path / 'mine.py'
  path.write_text('from jaxmodel.config import base_config\n'
                  'def get_config():\n'
                  '  c = base_config()\n'
                  '  c.batch_size = 7\n'
                  '  return c\n')
  config, *_ = config_lib.parse_command_line([f'--config={path}', '--config.num_epochs=3'])
  assert (config.batch_size, config.num_epochs) == (7, 3)


@pytest.mark.parametrize('argv,message', [
    (['--config=cifr'], "unknown config 'cifr': did you mean cifar"),
    (['--config=nope/missing.py'], "config file 'nope/missing.py' does not exist"),
    (['--config=cifar', '--config.batch_sise=3'], "unknown config key 'batch_sise': did you mean batch_size"),
    (['--config=cifar', '--config.optimizer.momentun=0.5'],
     "unknown config key 'optimizer.momentun' in 'optimizer': did you mean momentum"),
    (['--config=cifar', '--config.batch_size=big'], "config key 'batch_size' takes a int, not 'big'"),
    (['--config=cifar', '--config.batch_size.x=1'], "'batch_size' is a value, not a group"),
    (['--config=cifar', '--config.optimizer.learning_rate=-1'], 'learning_rate must be positive'),
    (['--config=cifar', '--config.label_smoothing=1.0'], 'label_smoothing must be in [0, 1)'),
    (['--config=cifar', '--config.num_epochs=0'], 'num_epochs must be positive'),
    (['--config=cifar', '--config.batch_size=None'], "'batch_size' must be an int, not None"),
    (['--config=cifar', '--config.optimizer.learning_rate=1e999'],
     "'optimizer.learning_rate' must be a finite number, not inf"),
    (['--config=cifar', '--config.optimizer.momentum=1.5'], 'momentum must be in [0, 1)'),
    (['--config=cifar', '--config.optimizer.eps=0'], 'eps must be positive'),
    (['--config=cifar', '--config.optimizer.name=lamb'], "optimizer.name 'lamb' is not"),
    (['--config=cifar', '--config.optimizer.schedule=cosine'], "schedule 'cosine' is not"),
    (['--config=cifar', '--config.loss=mse', '--config.label_smoothing=0.1'],
     'label_smoothing applies to the cross_entropy loss only'),
    (['--config=cifar', '--config.optimizer.nesterov=True', '--config.optimizer.momentum=0'],
     'nesterov needs optimizer.momentum > 0'),
    (['--config=cifar', '--config.data.std=(0.2, 0.0, 0.2)'], 'std > 0'),
    (['--config=cifar', '--config.data.prefetch=-1'], 'prefetch must be >= 0'),
    (['--config=cifar', '--wrkdir=x'], "unknown argument '--wrkdir=x': did you mean --workdir"),
    ([], 'pass --config=NAME'),
])
def test_bad_command_lines_raise_one_line_errors(argv, message):
  with pytest.raises(ConfigError) as error:
    config_lib.parse_command_line(argv)
  assert message in str(error.value)
  assert '\n' not in str(error.value)


def test_cli_error_exits_2_with_one_line_and_no_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'jaxmodel.train', '--config=cifar', '--config.optimizer.nam=adam'],
      cwd=tmp_path, capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 2
  assert result.stderr.strip() == ("error: unknown config key 'optimizer.nam' in 'optimizer': "
                                   "did you mean name")
  assert not os.listdir(tmp_path)  # nothing was created


def test_help_lists_the_bundled_configs(capsys):
  with pytest.raises(SystemExit) as exit_:
    config_lib.parse_command_line(['--help'])
  assert exit_.value.code == 0
  assert 'seed_tutorial' in capsys.readouterr().out
