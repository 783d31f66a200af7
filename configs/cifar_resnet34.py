"""ResNet-34 on CIFAR-10: cifar_resnet18's recipe with stages of (3, 4, 6, 3) basic blocks.

21,282,122 params. Measured here on a quiet 2-core CPU: 8.3 train images/s (46% MFU), so one
epoch of 45,000 images takes ~90 min; a 10-step budget (train[:1280]) reached 21.8% on 500
validation images in 215 s (experiments/README.md). Not trained to convergence here.
"""

from jaxmodel.configs import cifar_resnet18


def get_config():
  config = cifar_resnet18.get_config()
  config.model.stage_sizes = (3, 4, 6, 3)
  return config
