"""Transformers: a ViT for small images and a GPT-style decoder-only language model.

Both are stacks of the same pre-LayerNorm block (self-attention then MLP, each residual, dropout
on their outputs). The GPT's attention is causal and, built with `decode=True`, keeps a key/value
cache in the 'cache' collection so sampling feeds only the new tokens:

  model = GPT(vocab_size=65, block_size=128, decode=True)
  cache = model.init(rng, jnp.zeros((1, 128), jnp.int32))['cache']   # zeros, index 0
  logits, {'cache': cache} = model.apply({'params': p, 'cache': cache}, prompt, mutable=['cache'])
  logits, {'cache': cache} = model.apply({'params': p, 'cache': cache}, next_token, mutable=['cache'])
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class SelfAttention(nn.Module):
  """Multi-head self-attention, causal or not; with `decode`, over a key/value cache."""
  num_heads: int
  causal: bool = False
  dropout: float = 0.0
  decode: bool = False
  max_length: int = 0  # the cache length, with decode

  @nn.compact
  def __call__(self, x, train: bool):
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    q, k, v = jnp.split(nn.Dense(3 * width, name='qkv')(x), 3, axis=-1)
    q, k, v = (a.reshape(batch, length, self.num_heads, head_dim) for a in (q, k, v))
    query_positions = jnp.arange(length)
    if self.decode:
      shape = (batch, self.max_length, self.num_heads, head_dim)
      cached_k = self.variable('cache', 'key', jnp.zeros, shape, k.dtype)
      cached_v = self.variable('cache', 'value', jnp.zeros, shape, v.dtype)
      index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
      if not self.is_initializing():  # init only shapes the cache
        start = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, start, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, start, 0, 0))
        index.value = start + length
        k, v = cached_k.value, cached_v.value
        query_positions = start + query_positions
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head_dim).astype(q.dtype)
    if self.causal:  # a query sees keys at its position and before (empty cache slots are after)
      allowed = query_positions[:, None] >= jnp.arange(k.shape[1])[None, :]
      scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    weights = nn.Dropout(self.dropout, deterministic=not train)(jax.nn.softmax(scores, axis=-1))
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(batch, length, width)
    return nn.Dense(width, name='out')(out)


class Block(nn.Module):
  """The pre-LayerNorm Transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  causal: bool = False
  decode: bool = False
  max_length: int = 0

  @nn.compact
  def __call__(self, x, train: bool):
    drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)
    y = SelfAttention(self.num_heads, self.causal, self.dropout, self.decode, self.max_length)(
        nn.LayerNorm()(x), train)
    x = x + drop(y)
    y = nn.Dense(self.mlp_dim)(nn.LayerNorm()(x))
    y = nn.Dense(x.shape[-1])(nn.gelu(y))
    return x + drop(y)


# ViT-Ti and ViT-S (Touvron et al. 2021 / big_vision): width, depth, heads, MLP width.
VIT_SIZES = {'tiny': (192, 12, 3, 768), 'small': (384, 12, 6, 1536)}


class ViT(nn.Module):
  """A Vision Transformer for small images: patch_size x patch_size patches, learned position
  embeddings, mean-pooled tokens (no class token) into a linear head.

  `size` picks a preset ('tiny', 'small'); width/depth/num_heads/mlp_dim override it when set.
  """
  num_classes: int = 10
  size: str = 'tiny'
  patch_size: int = 4
  width: Optional[int] = None
  depth: Optional[int] = None
  num_heads: Optional[int] = None
  mlp_dim: Optional[int] = None
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.size not in VIT_SIZES:
      raise ValueError(f'unknown ViT size {self.size!r}; choose one of {sorted(VIT_SIZES)}')
    preset = VIT_SIZES[self.size]
    width, depth, num_heads, mlp_dim = (value if value is not None else default for value, default
                                        in zip((self.width, self.depth, self.num_heads,
                                                self.mlp_dim), preset))
    p = self.patch_size
    x = nn.Conv(width, (p, p), (p, p), padding='VALID', name='patches')(x)
    x = x.reshape(x.shape[0], -1, width)
    x = x + self.param('position', nn.initializers.normal(0.02), x.shape[1:])
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for _ in range(depth):
      x = Block(num_heads, mlp_dim, self.dropout)(x, train)
    x = jnp.mean(nn.LayerNorm()(x), axis=1)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros)(x)


class GPT(nn.Module):
  """A decoder-only Transformer language model: (B, T) token ids -> (B, T, vocab) logits.

  Token plus learned position embeddings, `depth` causal blocks, a final LayerNorm and a head
  that is the token embedding transposed when `tie_weights`. Sequences hold at most `block_size`
  tokens (with `decode`, prompt plus generated tokens).
  """
  vocab_size: int = 256
  block_size: int = 128
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: Optional[int] = None  # default 4 x width
  dropout: float = 0.0
  tie_weights: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    length = tokens.shape[1]
    embed = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                     name='token_embedding')
    positions = jnp.arange(length)
    if self.decode:  # where this call's tokens sit in the sequence the cache holds so far
      start = self.variable('cache', 'position', lambda: jnp.zeros((), jnp.int32))
      if not self.is_initializing():
        positions = start.value + positions
        start.value = start.value + length
    position_table = self.param('position_embedding', nn.initializers.normal(0.02),
                                (self.block_size, self.width))
    x = embed(tokens) + jnp.take(position_table, positions, axis=0)[None]
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for _ in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim or 4 * self.width, self.dropout, causal=True,
                decode=self.decode, max_length=self.block_size)(x, train)
    x = nn.LayerNorm()(x)
    if self.tie_weights:
      return embed.attend(x)
    return nn.Dense(self.vocab_size, name='head')(x)
