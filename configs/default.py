"""The base config: every key a run reads, with its default (see jaxmodel.config.base_config).

Train: python -m jaxmodel.train --config=default --config.KEY=VALUE
"""

from jaxmodel.config import base_config


def get_config():
  return base_config()
