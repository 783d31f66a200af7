"""The PyTorch CIFAR-10 tutorial recipe, exactly: the tutorial CNN, SGD lr 0.001 momentum 0.9,
batch 4, 2 epochs, no augmentation, inputs normalized to [-1, 1].

The PyTorch tutorial reports about 55% test accuracy. Measured against the PyTorch tutorial
program on the same data (scripts/recipe_benchmark.py, experiments/README.md): on an AMD EPYC
Zen 1 (AVX2), 55.40% validation accuracy at 3,209 train images/s against 54.24% at 912 (3.52x);
on an Intel Ice Lake (AVX-512), 55.24% at 7,781 images/s against 53.04% at 2,095 (3.71x).
"""

from jaxmodel.config import base_config


def get_config():
  config = base_config()
  config.model = {'name': 'seed_cnn'}
  config.batch_size = 4
  config.eval_batch_size = 1000
  config.num_epochs = 2
  config.data.crop_padding = 0
  config.data.flip = False
  # Batches of 4 are bound by per-step overheads: making them inside the step ran 2.6x faster
  # here than the Grain pipeline (1,586 vs 603 images/s), and 50 steps per call ~1.5x faster
  # again (experiments/README.md).
  config.data.on_device = True
  config.steps_per_dispatch = 50
  config.data.mean = (0.5, 0.5, 0.5)
  config.data.std = (0.5, 0.5, 0.5)
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.001
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.0
  config.optimizer.schedule = 'constant'
  config.log_every_steps = 1000
  # As the tutorial program: no gradient norm, which took ~10% of these batch-4 steps on XLA:CPU
  # (experiments/README.md).
  config.log_grad_norm = False
  # XLA:CPU on one thread: its operations here take microseconds, and waking the second core's
  # thread for each cost more (1.15-1.31x faster on one, experiments/README.md). The
  # convolutions of batch 4 already run on one (jaxmodel/onednn.py).
  config.parallel.cpu_threads = 1
  config.checkpoint_every_steps = 5000
  return config
