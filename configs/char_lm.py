"""A character-level GPT language model (nanoGPT's shakespeare_char recipe, smaller).

Data: TFDS `tiny_shakespeare` (downloaded by TFDS on first use where the internet is reachable),
or, offline, any local text prepared with the same layout:
  python -m jaxmodel.prepare_text FILE [FILE ...] --name my_text
  python -m jaxmodel.train --config=char_lm --config.dataset=my_text
Batches are windows of block_size characters; the loss is next-character cross-entropy, reported
as validation loss and bits per character (loss / ln 2). Sample from a run:
  python -m jaxmodel.generate --workdir=W --prompt="ROMEO:" --temperature=0.8 --top_k=10

Measured here (experiments/README.md), short budgets, not the full recipe: offline text (10
Python standard-library modules, 700,856 train / 77,872 validation characters, prepared with
prepare_text), 822,144 params, on a quiet 2-core CPU: 4,350 tokens/s (34 windows of 128 per
second, MFU 21-25%); 5 epochs (425 steps of 64 x 128 characters) reached a validation loss of
2.045 nats = 2.95 bits per character (next-character accuracy 45%) in 14 min wall. Samples have
Python's shape with invented words: far from converged.
"""

from jaxmodel.config import base_config


def get_config():
  config = base_config()
  config.dataset = 'tiny_shakespeare'
  config.train_split = 'train'
  config.eval_split = 'validation'
  # Text has nothing to crop, flip or normalize.
  config.data.crop_padding = 0
  config.data.flip = False
  config.model = {'name': 'gpt', 'block_size': 128, 'width': 128, 'depth': 4, 'num_heads': 4,
                  'dropout': 0.1, 'tie_weights': True}
  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_epochs = 10
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 2e-3
  config.optimizer.b2 = 0.99
  config.optimizer.weight_decay = 0.1
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_fraction = 0.05
  config.optimizer.final_scale = 0.1
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  return config
