"""Optax optimizers and learning-rate schedules chosen by name in the config."""

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('constant', 'warmup_cosine', 'warmup_linear')
OPTIMIZERS = ('sgd', 'adam', 'adamw')


def make_schedule(config: Any, total_steps: int) -> optax.Schedule:
  """The learning rate per step: constant, or a linear warm-up then cosine or linear decay.

  Warm-up starts at `init_scale` x peak; decay ends at `final_scale` x peak on the last step.
  """
  peak = config.learning_rate
  if config.schedule == 'constant':
    return optax.constant_schedule(peak)
  if config.schedule not in SCHEDULES:
    raise ValueError(f'unknown schedule {config.schedule!r}; choose one of {SCHEDULES}')
  warmup = min(int(round(config.warmup_fraction * total_steps)), total_steps - 1)
  decay_steps = max(total_steps - warmup, 1)
  if config.schedule == 'warmup_cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.final_scale)
  else:
    decay = optax.linear_schedule(peak, peak * config.final_scale, decay_steps)
  warm = optax.linear_schedule(peak * config.init_scale, peak, warmup)
  return optax.join_schedules([warm, decay], [warmup])


def _base_optimizer(config: Any, learning_rate: optax.ScalarOrSchedule,
                    weight_decay: float) -> optax.GradientTransformation:
  if config.name == 'sgd':
    # Weight decay as L2 added to the gradient before momentum, as torch.optim.SGD does.
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, config.momentum or None, nesterov=config.nesterov))
  if config.name == 'adam':
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.adam(learning_rate, config.b1, config.b2, config.eps))
  if config.name == 'adamw':
    return optax.adamw(learning_rate, config.b1, config.b2, config.eps,
                       weight_decay=weight_decay)
  raise ValueError(f'unknown optimizer {config.name!r}; choose one of {OPTIMIZERS}')


@dataclasses.dataclass(frozen=True)
class Lookahead:
  """airbench's lookahead over all of the model's float state, params and BatchNorm statistics:
  after every `every`-th step, average <- lerp(average, current, 1 - decay(step)), then
  current <- average; after the last step, current <- average. A train state holds the average
  (TrainState.average); train_step calls `update` after the optimizer's step.
  """
  every: int
  decay: Callable[[jax.Array], jax.Array]  # of the 1-based step number
  total_steps: int

  def init(self, params: Any, model_state: Any) -> dict:
    # Its own buffers, not the params': a train step donates both.
    return jax.tree.map(jnp.copy, {'params': params, 'model_state': model_state})

  def update(self, step: jax.Array, params: Any, model_state: Any, average: dict
             ) -> tuple[Any, Any, dict]:
    """(params, model_state, average) after optimizer step `step` (1-based)."""
    averaging = step % self.every == 0
    sync = averaging | (step == self.total_steps)
    keep = jnp.where(averaging, self.decay(step), 1.0)
    current = {'params': params, 'model_state': model_state}

    floating = lambda x: jnp.issubdtype(x.dtype, jnp.floating)  # airbench averages float state
    average = jax.tree.map(
        lambda a, x: jnp.where(sync, keep * a + (1 - keep) * x, a).astype(a.dtype)
        if floating(a) else a, average, current)
    current = jax.tree.map(lambda a, x: jnp.where(sync, a, x) if floating(x) else x,
                           average, current)
    return current['params'], current['model_state'], average


def make_lookahead(config: Any, total_steps: int) -> Lookahead | None:
  """The lookahead `config.optimizer`-style settings ask for (lookahead_every > 0), or None."""
  if not config.lookahead_every:
    return None
  every, base, power = config.lookahead_every, config.lookahead_decay, config.lookahead_power
  # airbench's decay: base^every x (progress)^power, so the average matters most at the end.
  return Lookahead(every, lambda step: base ** every * (step / total_steps) ** power, total_steps)


def param_labels(params: Any, patterns: dict[str, Any]) -> Any:
  """Labels each parameter with the first of `patterns` its path ('a/b/kernel') matches."""
  def label(path, _):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    return next((p for p in patterns if re.search(p, name)), 'default')
  return jax.tree_util.tree_map_with_path(label, params)


def freeze_after(pattern: str, steps: int) -> optax.GradientTransformation:
  """Lets the params matching `pattern` train for `steps` steps, then zeroes their updates:
  airbench's whitening bias trains for 3 epochs. A lookahead still averages them, as airbench's
  does."""
  mask = lambda params: jax.tree.map(lambda label: label == pattern,
                                     param_labels(params, {pattern: None}))
  return optax.masked(optax.scale_by_schedule(lambda count: (count < steps).astype(jnp.float32)),
                      mask)


def make_optimizer(config: Any, total_steps: int) -> optax.GradientTransformation:
  """An optax optimizer from `config.optimizer`-style settings.

  `lr_multipliers` maps a regex on parameter paths to a learning-rate multiplier (0 freezes the
  matched parameters). Weight decay per step stays the same for every group, as airbench does.
  `freeze_after` maps a regex to the fraction of all steps after which those parameters stop.
  The lookahead settings are read by `make_lookahead`: it averages BatchNorm statistics too.
  """
  schedule = make_schedule(config, total_steps)

  def group(multiplier: float) -> optax.GradientTransformation:
    if multiplier == 0:
      return optax.set_to_zero()
    return _base_optimizer(config, lambda step: schedule(step) * multiplier,
                           config.weight_decay / multiplier)

  multipliers = dict(config.lr_multipliers)
  if multipliers:
    transforms = {p: group(m) for p, m in multipliers.items()} | {'default': group(1.0)}
    tx = optax.multi_transform(transforms, lambda params: param_labels(params, multipliers))
  else:
    tx = group(1.0)
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  for pattern, fraction in config.get('freeze_after') or ():  # .get: runs saved before the key
    tx = optax.chain(tx, freeze_after(pattern, int(round(fraction * total_steps))))
  return tx
