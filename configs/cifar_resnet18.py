"""ResNet-18 on CIFAR-10 (CIFAR stem: 3x3 conv, no pooling): SGD + Nesterov, cosine decay,
crop + flip augmentation, label smoothing 0.1, weight decay 5e-4.

The usual figure for this recipe on a GPU is ~95% after 200 epochs (not measured here).
Measured here: see the budget run below (filled in from experiments/README.md).
"""

from jaxmodel.config import base_config


def get_config():
  config = base_config()
  config.model = {'name': 'resnet', 'stage_sizes': (2, 2, 2, 2), 'width': 64, 'dropout': 0.0}
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
