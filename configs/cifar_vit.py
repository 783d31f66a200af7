"""A ViT on CIFAR-10: 4x4 patches (64 tokens), ViT-Ti ('tiny': width 192, depth 12, 3 heads) or
--config.model.size=small (ViT-S: 384, 12, 6); AdamW, warm-up + cosine, crop + flip, label
smoothing 0.1, dropout 0.1, gradient clipping.

ViTs trained from scratch on CIFAR-10 need long schedules (about 90% after ~200 epochs on a GPU,
published; not measured here). Measured here (experiments/README.md), a smoke budget only:
5,362,378 params (tiny); --config.train_split='train[:1280]' --config.num_epochs=2 (20 steps of
128) --config.eval_split='train[90%:91%]': 21.0% validation accuracy on 500 images (chance 10%),
1,059 s wall, 3.5 images/s, on 2 cores shared with 3 other jobs (load ~10-15): timings are not
representative. Quiet-machine throughput: the command in experiments/README.md.
"""

from jaxmodel.config import base_config


def get_config():
  config = base_config()
  config.model = {'name': 'vit', 'size': 'tiny', 'patch_size': 4, 'dropout': 0.1}
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 30
  config.label_smoothing = 0.1
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.b2 = 0.99
  config.optimizer.weight_decay = 0.05
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_fraction = 0.1
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  return config
