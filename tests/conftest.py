"""Shared fixtures: a small real CIFAR-10 dataset prepared from the offline copy.

The copy lives beside the repo at ../shared/data (never in it). Tests that need it skip when it
is absent, unless JAXMODEL_REQUIRE_DATA=1 (set by .ci/run) makes that an error.
"""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_TAR = pathlib.Path(os.environ.get(
    'JAXMODEL_CIFAR_TAR', REPO.parent / 'shared' / 'data' / 'cifar10-jpeg-train.tar.gz'))


def require_cifar_tar() -> pathlib.Path:
  if not CIFAR_TAR.exists():
    message = f'real data not found at {CIFAR_TAR} (see ../shared/data/README.md)'
    if os.environ.get('JAXMODEL_REQUIRE_DATA') == '1':
      pytest.fail(message)
    pytest.skip(message)
  return CIFAR_TAR


@pytest.fixture(scope='session')
def cifar_small(tmp_path_factory) -> dict:
  """1,000 real CIFAR-10 images (100 per class) as TFDS dataset 'cifar10_small'."""
  from jaxmodel.prepare import prepare_image_folder
  data_dir = tmp_path_factory.mktemp('tfds')
  summary = prepare_image_folder(str(require_cifar_tar()), 'cifar10_small', str(data_dir),
                                 max_per_class=100)
  return {'name': 'cifar10_small', 'data_dir': str(data_dir), 'summary': summary}
