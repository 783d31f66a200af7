"""airbench94 (../shared/reference/airbench94.md): CIFAR-10 to 94% in ~10 epochs on a GPU.

The full recipe on `cifar`'s optimizer: the stride-1 2x2 whitening stem (frozen kernel), groups of
64/256/256, batch 1024, 10 epochs (airbench: 9.9), data held on the device with 2-pixel reflect
translations and alternating flips, lookahead averaging every 5 steps, and validation with
airbench's 6-view test-time augmentation. The run reports its training time to 85%, 90% and 93%
(data-dependent init and train steps; not compiling, not the per-epoch evaluations), to compare
with `scripts/torch_speedrun.py`, the same recipe in PyTorch.

As airbench, the whitening bias trains for the first 3 of the 10 epochs, and the lookahead
averages the BatchNorm statistics along with the params. What differs: the loss is the batch
mean (lr and weight decay rescaled to match its summed loss), everything is float32, and the
GELU is the tanh form.

Measured here (experiments/README.md): 1,971,640 params, 729 GFLOP per step of 1,024 (XLA's
count plus the oneDNN convolutions'). The full run on a 2-core Intel Ice Lake CPU (session 11):
309 train images/s, 85% at 1,004 s and 90% at 1,427 s of training (the last epoch), 90.4% at
the end, 93% not reached; PyTorch's twin (scripts/torch_speedrun.py), the same recipe, 153
images/s: 85% at 2,005 s, 90% at 2,880 s, 90.6% at the end. Both learn alike per epoch, so the
gap to airbench's 94% (on its 10,000 test images, after 476 steps on 50,000) lies in what they
share: this JPEG copy of the data, fewer steps and images, the tanh GELU. Twice the steps
(`--config.num_epochs=20`, session 14) reached 91.4%, and 85% and 90% later than 10 epochs do.
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
  config.optimizer.freeze_after = (('whiten/bias', 0.3),)  # 3 of 10 epochs, as airbench
  config.eval_tta = 'flip_translate'
  config.accuracy_marks = (0.85, 0.90, 0.93)
  return config
