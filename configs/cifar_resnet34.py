"""ResNet-34 on CIFAR-10: cifar_resnet18's recipe with stages of (3, 4, 6, 3) basic blocks.

21,282,122 params. Measured here on a quiet 2-core CPU: 8.3 train images/s (46% MFU), so one
epoch of 45,000 images takes ~90 min; a 10-step budget (train[:1280]) reached 21.8% on 500
validation images in 215 s (experiments/README.md). Not trained to convergence here.
"""

from jaxmodel.config import base_config


def get_config():
  config = base_config()
  config.model = {'name': 'resnet', 'stage_sizes': (3, 4, 6, 3), 'width': 64, 'dropout': 0.0}
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 30
  config.label_smoothing = 0.1
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_fraction = 0.02
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  return config
