"""airbench94 (../shared/reference/airbench94.md): CIFAR-10 to 94% in ~10 epochs on a GPU.

The full recipe on `cifar`'s optimizer: the stride-1 2x2 whitening stem (frozen kernel), groups of
64/256/256, batch 1024, 10 epochs (airbench: 9.9), data held on the device with 2-pixel reflect
translations and alternating flips, lookahead averaging every 5 steps, and validation with
airbench's 6-view test-time augmentation. The run reports its training time to 85%, 90% and 93%
(data-dependent init and train steps; not compiling, not the per-epoch evaluations), to compare
with `scripts/torch_speedrun.py`, the same recipe in PyTorch.

What differs from airbench: the loss is the batch mean (lr and weight decay rescaled to match its
summed loss), the whitening bias trains throughout (airbench freezes it after 3 epochs), the
lookahead averages the params (airbench also averages BatchNorm statistics), and everything is
float32.

Measured here (experiments/README.md): 1,971,640 params, 729 GFLOP per step of 1,024 (XLA's
count plus the oneDNN convolutions'); 113 train images/s (67% MFU) with the convolutions on
oneDNN, so the full 10 epochs take ~70 min on this 2-core CPU, and PyTorch's twin runs at 81-83
images/s. A 3-epoch budget on 5,000 images reached 44.0% (TTA), 40% at 112 s of training
(PyTorch: 44.3%, 40% at 152 s). The 85/90/93% marks have not been run here yet.
"""

from jaxmodel.configs import cifar


def get_config():
  config = cifar.get_config()
  config.model.widths = (64, 256, 256)
  config.model.whiten_stride = 1
  config.batch_size = 1024
  config.eval_batch_size = 1000
  config.num_epochs = 10
  config.data.on_device = True
  config.data.pad_mode = 'reflect'
  config.data.alternating_flip = True
  config.optimizer.learning_rate = 11.5 / (1 + 1 / (1 - 0.85))  # cifar's, at batch 1024
  config.optimizer.lookahead_every = 5
  config.optimizer.lookahead_decay = 0.95
  config.optimizer.lookahead_power = 3.0
  config.eval_tta = 'flip_translate'
  config.accuracy_marks = (0.85, 0.90, 0.93)
  return config
