"""Sample text from a trained language model:

    python -m jaxmodel.generate --workdir W --prompt "ROMEO:" [--max_new_tokens N]
        [--temperature T] [--top_k K] [--seed S] [--debug]

Reads the run's config.json, vocabulary.json and latest checkpoint from W. Decoding keeps a
key/value cache (the model built with decode=True), so each new character costs one position,
and runs as one compiled scan. The model's context holds block_size characters, prompt included:
generation stops there (the default --max_new_tokens fills it; more is an error). The same seed
gives the same text.
"""

import argparse
import functools
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxmodel import checkpoint, models, text


class GenerateError(ValueError):
  """A workdir or prompt that cannot be sampled from; its message is one line saying what to do."""


def load_model(workdir: str) -> tuple[nn.Module, dict, str]:
  """(the decoding model, its trained params, the vocabulary) of the run in `workdir`."""
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(config_path):
    raise GenerateError(f'{workdir} holds no run (no config.json); pass the --workdir of a '
                        'language-model run, e.g. one trained with --config=char_lm')
  if not os.path.isfile(os.path.join(workdir, text.VOCABULARY_FILE)):
    raise GenerateError(f'{workdir} holds no language-model run (no {text.VOCABULARY_FILE}); '
                        'train one on a text dataset, e.g. --config=char_lm')
  with open(config_path) as f:
    model_config = json.load(f)['model']
  vocab = text.load_vocabulary(workdir)
  kwargs = {k: v for k, v in model_config.items() if k != 'name'}
  model = models.get_model(model_config['name'], vocab_size=len(vocab), decode=True, **kwargs)
  manager = (checkpoint.make_manager(workdir)
             if os.path.isdir(os.path.join(workdir, 'checkpoints')) else None)
  step = manager.latest_step() if manager else None
  if step is None:
    raise GenerateError(f'{workdir} has no checkpoint yet; let training save one '
                        '(every checkpoint_every_steps, and at the end)')
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return model, restored['state']['params'], vocab


def _choose(logits: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """A token id from (vocab,) logits: greedy at temperature 0, else sampled from the top k."""
  if top_k:
    kth_largest = jax.lax.top_k(logits, top_k)[0][-1]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'top_k'))
def sample(model: nn.Module, params: dict, prompt: jax.Array, key: jax.Array,
           max_new_tokens: int, temperature: float = 1.0, top_k: int = 0) -> jax.Array:
  """`max_new_tokens` token ids following the (T,) `prompt`, sampled with a key/value cache."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, model.block_size), jnp.int32))['cache']
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  logits, variables = model.apply({'params': params, 'cache': cache}, prompt[None],
                                  mutable=['cache'])

  def next_token(carry, key):
    cache, last_logits = carry
    token = _choose(last_logits, key, temperature, top_k)
    logits, variables = model.apply({'params': params, 'cache': cache}, token[None, None],
                                    mutable=['cache'])
    return (variables['cache'], logits[0, -1]), token

  keys = jax.random.split(key, max_new_tokens)
  _, tokens = jax.lax.scan(next_token, (variables['cache'], logits[0, -1]), keys)
  return tokens


def generate(model: nn.Module, params: dict, vocab: str, prompt: str,
             max_new_tokens: int | None = None, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0) -> str:
  """The prompt's continuation (new characters only); raises GenerateError on bad input."""
  if not prompt:
    raise GenerateError('the prompt is empty; pass at least one character with --prompt')
  try:
    prompt_ids = text.encode(prompt, vocab)
  except ValueError as e:
    raise GenerateError(f'--prompt: {e}') from None
  room = model.block_size - len(prompt_ids)
  if room < 1:
    raise GenerateError(f'the prompt has {len(prompt_ids)} characters; the model reads at most '
                        f'{model.block_size} (block_size) including new ones: shorten it')
  if max_new_tokens is None:
    max_new_tokens = room
  if not 1 <= max_new_tokens <= room:
    raise GenerateError(f'--max_new_tokens {max_new_tokens} must be in [1, {room}]: the model '
                        f'reads {model.block_size} characters (block_size), prompt included')
  if temperature < 0 or top_k < 0 or top_k > len(vocab):
    raise GenerateError(f'--temperature must be >= 0 and --top_k in [0, {len(vocab)}]')
  tokens = sample(model, params, jnp.asarray(prompt_ids), jax.random.PRNGKey(seed),
                  max_new_tokens, temperature, top_k)
  return text.decode(jax.device_get(tokens), vocab)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m jaxmodel.generate',
                                   description='Sample text from a trained language model.')
  parser.add_argument('--workdir', required=True, help='the run to sample from')
  parser.add_argument('--prompt', required=True, help='the text to continue')
  parser.add_argument('--max_new_tokens', type=int, default=None,
                      help='characters to add (default: fill the context, block_size)')
  parser.add_argument('--temperature', type=float, default=1.0, help='0 picks the likeliest')
  parser.add_argument('--top_k', type=int, default=0, help='sample among the k likeliest; 0: all')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--debug', action='store_true', help='tracebacks instead of one-line errors')
  args = parser.parse_args(argv)
  try:
    model, params, vocab = load_model(args.workdir)
    print(args.prompt + generate(model, params, vocab, args.prompt, args.max_new_tokens,
                                 args.temperature, args.top_k, args.seed))
  except (GenerateError, ValueError) as e:
    if args.debug:
      raise
    print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
