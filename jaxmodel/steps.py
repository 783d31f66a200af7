"""The train state and the pure train/eval steps.

`train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> metrics` are pure:
everything they depend on is in their arguments, so they jit once and compose (vmap, scan, shard).
A batch is a dict: 'image' float (B, H, W, C), 'label' int (B,) and, for eval, 'mask' (B,) with 0
on padding examples. A language model's batch has 'tokens' int (B, T) in place of 'image' and
'label' int (B, T), the next token at each position: losses and accuracy then average over
positions too, and the mask covers whole sequences.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  """Everything training changes (pytree leaves) and the functions it uses (static fields)."""
  step: jax.Array
  params: Any
  model_state: Any  # non-trainable collections, e.g. BatchNorm's 'batch_stats'
  opt_state: optax.OptState
  rng: jax.Array  # a raw uint32 key; each step draws from fold_in(rng, step)
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  loss_fn: Callable = struct.field(pytree_node=False)
  # airbench's lookahead (optim.Lookahead) and its average of params and model_state, or None.
  lookahead: Any = struct.field(pytree_node=False, default=None)
  average: Any = None

  def variables(self) -> dict:
    return {'params': self.params, **self.model_state}

  def restart_from(self, params: Any, model_state: Any = None) -> 'TrainState':
    """This state with new params (and model_state), the optimizer and lookahead started on them:
    e.g. after a data-dependent init, or fine-tuning from another run."""
    model_state = self.model_state if model_state is None else model_state
    average = self.lookahead.init(params, model_state) if self.lookahead else None
    return self.replace(params=params, model_state=model_state, opt_state=self.tx.init(params),
                        average=average)


def cross_entropy_loss(logits, labels, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def mse_loss(logits, labels):
  """Per-example mean squared error between the logits and one-hot labels."""
  return jnp.mean(jnp.square(logits - jax.nn.one_hot(labels, logits.shape[-1])), axis=-1)


def get_loss(name: str, label_smoothing: float = 0.0) -> Callable:
  if name == 'cross_entropy':
    return functools.partial(cross_entropy_loss, label_smoothing=label_smoothing)
  if name == 'mse':
    if label_smoothing:
      raise ValueError('label_smoothing applies to the cross_entropy loss only; set it to 0 for mse')
    return mse_loss
  raise ValueError(f"unknown loss {name!r}; choose 'cross_entropy' or 'mse'")


def model_inputs(batch: dict):
  """What the model reads from `batch`: images, or token ids for a language model."""
  return batch['image'] if 'image' in batch else batch['tokens']


@dataclasses.dataclass(frozen=True)
class MixedPrecisionApply:
  """`apply` computing in `dtype` (e.g. bfloat16) on float32 variables, which stay the masters.

  Float variables and inputs are cast to `dtype` going in; float outputs (logits, updated
  BatchNorm statistics) come back as float32, so the state keeps its dtypes and the loss is
  float32. Gradients flow through the casts to the float32 params.
  """
  apply: Callable
  dtype: str

  def __call__(self, variables, inputs, *args, **kwargs):
    cast = lambda dtype: lambda x: (x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                                    else x)
    outputs = self.apply(jax.tree.map(cast(self.dtype), variables),
                         cast(self.dtype)(jnp.asarray(inputs)), *args, **kwargs)
    return jax.tree.map(cast(jnp.float32), outputs)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, example_images,
                       rng: jax.Array, loss_fn: Callable = cross_entropy_loss,
                       compute_dtype: str = 'float32', lookahead: Any = None) -> TrainState:
  """Initializes the model on `example_images` and the optimizer on its params.

  Params and optimizer state are float32; `compute_dtype` 'bfloat16' runs the model's forward
  and backward passes in bfloat16 (MixedPrecisionApply). `lookahead` (optim.make_lookahead)
  averages params and model_state every few steps.
  """
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init(init_rng, example_images, train=False)
  params = variables.pop('params')
  apply_fn = model.apply
  if compute_dtype != 'float32':
    apply_fn = MixedPrecisionApply(model.apply, compute_dtype)
  model_state = dict(variables)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=tx.init(params), rng=state_rng, apply_fn=apply_fn, tx=tx,
                    loss_fn=loss_fn, lookahead=lookahead,
                    average=lookahead.init(params, model_state) if lookahead else None)


def train_step(state: TrainState, batch: dict, axis_name: str | None = None,
               grad_norm: bool = True) -> tuple[TrainState, dict]:
  """One optimizer step on `batch`; returns the new state and the batch's mean loss/accuracy,
  and with `grad_norm` the gradients' global norm.

  Under shard_map, `axis_name` names the device axis the batch is split over: gradients and
  metrics are averaged over it (BatchNorm statistics too, by the model's `norm_axis_name`).
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:  # each device drops out different units
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

  def loss_and_updates(params):
    logits, model_state = state.apply_fn(
        {'params': params, **state.model_state}, model_inputs(batch), train=True,
        rngs={'dropout': dropout_rng}, mutable=list(state.model_state))
    return jnp.mean(state.loss_fn(logits, batch['label'])), (logits, model_state)

  (loss, (logits, model_state)), grads = jax.value_and_grad(loss_and_updates, has_aux=True)(
      state.params)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  if axis_name is not None:
    grads, loss, accuracy = jax.lax.pmean((grads, loss, accuracy), axis_name)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params, model_state, average = (optax.apply_updates(state.params, updates), dict(model_state),
                                  state.average)
  if state.lookahead is not None:
    params, model_state, average = state.lookahead.update(state.step + 1, params, model_state,
                                                          average)
  new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                            opt_state=opt_state, average=average)
  metrics = {'loss': loss, 'accuracy': accuracy}
  if grad_norm:
    metrics['grad_norm'] = optax.tree.norm(grads)
  return new_state, metrics


TTA_MODES = ('none', 'flip', 'flip_translate')


def tta_logits(apply_fn: Callable, variables: dict, images: jax.Array, tta: str = 'none'
               ) -> jax.Array:
  """Eval logits of (B, H, W, C) images, averaged over test-time augmentations ('none': the
  model's logits of any input, token ids too).

  'flip': the mean over the images and their mirror images. 'flip_translate' (airbench's): half
  that, half the same over the images translated by one pixel up-left and down-right (reflect
  padded): 6 forward passes.
  """
  if tta not in TTA_MODES:
    raise ValueError(f'unknown test-time augmentation {tta!r}; choose from {TTA_MODES}')
  logits = lambda x: apply_fn(variables, x, train=False)
  with_flip = lambda x: (logits(x) + logits(x[:, :, ::-1])) / 2
  if tta == 'none':
    return logits(images)
  if tta == 'flip':
    return with_flip(images)
  h, w = images.shape[1:3]
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  translated = (with_flip(padded[:, :h, :w]) + with_flip(padded[:, 2:, 2:])) / 2
  return (with_flip(images) + translated) / 2


def eval_step(state: TrainState, batch: dict, tta: str = 'none') -> dict:
  """Sums of loss and correct predictions over the unmasked examples, and their count.

  Sums (not means) let a caller add batches up so every example counts exactly once. `tta`
  averages image models' logits over test-time augmentations (see tta_logits).
  """
  logits = tta_logits(state.apply_fn, state.variables(), model_inputs(batch), tta)
  # A sequence's mask covers each of its positions: count and sum over (B,) or (B, T).
  mask = batch['mask'].reshape(batch['mask'].shape + (1,) * (batch['label'].ndim - 1))
  mask = jnp.broadcast_to(mask, batch['label'].shape).astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {'loss_sum': jnp.sum(state.loss_fn(logits, batch['label']) * mask),
          'correct': jnp.sum(correct * mask), 'count': jnp.sum(mask)}
