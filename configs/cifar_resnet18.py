"""ResNet-18 on CIFAR-10 (CIFAR stem: 3x3 conv, no pooling): SGD + Nesterov, cosine decay,
crop + flip augmentation, label smoothing 0.1, weight decay 5e-4.

The usual figure for this recipe on a GPU is ~95% after 200 epochs (not measured here).
Measured here (experiments/README.md), a smoke budget only (a CPU epoch of 45,000 images takes
hours): 11,173,962 params; --config.train_split='train[:1280]' --config.num_epochs=2 (20 steps of
128) --config.eval_split='train[90%:91%]': 25.8% validation accuracy on 500 images (chance 10%),
1,183 s wall, 2.8 images/s, on 2 cores shared with 3 other jobs (load ~15): timings are not
representative. Quiet-machine throughput: the command in experiments/README.md.
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
