"""Text encoders: one interface, and a small transformer encoder trained jointly with the DiT.

A text encoder turns prompts into per-token embeddings ``emb (B, L, D)`` and a
padding ``mask (B, L)`` (True = real token) that the DiT cross-attends to. The work
is split in two so that training stays pure:

* ``tokenize(prompts) -> (ids, mask)`` runs on the host in numpy, so it can live in a
  data pipeline;
* ``apply(params, ids, mask) -> emb`` is a pure JAX function of the parameters, which
  training jits (and differentiates, when the encoder is trained jointly);
* ``encode(params, prompts)`` chains the two for sampling and notebooks.

``TextEncoder`` is that interface; a pretrained encoder (umT5, say) implements it
with its own tokenizer and weights. ``TransformerTextEncoder`` is the built-in one: a
small pre-norm transformer over UTF-8 bytes (``ByteTokenizer``) or hashed words
(``WordTokenizer``); neither needs a vocabulary file, so nothing is downloaded.

The empty prompt is the *unconditional* prompt of classifier-free guidance. It
encodes to ``[BOS, EOS]``, never to an all-padding row, so the mask always has a
True entry and cross-attention over it stays well-defined.
"""

from __future__ import annotations

import json
import re
import warnings
import zlib
from typing import Any, Protocol, Sequence, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit.attention import BACKENDS, MultiHeadAttention
from vdit.layers import ACT, MLP, RMSNorm, constrain, partitioned

Dtype = Any
Params = Any

# Special token ids; byte ``b`` is token ``b + BYTE_OFFSET``.
PAD = 0
BOS = 1
EOS = 2
MASK = 3  # reserved (masked-token objectives); the tokenizer never emits it
BYTE_OFFSET = 4
VOCAB_SIZE = BYTE_OFFSET + 256  # 260


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than ``max_length`` tokens and lost its tail.

    A dedicated category so a pipeline with long captions can filter it:
    ``warnings.simplefilter("ignore", PromptTruncatedWarning)``.
    """


def as_prompt_list(prompts: Any) -> list[str]:
    """Checks that ``prompts`` is a str or a list/tuple of str; returns a list.

    A single str is a batch of one.

    Raises:
      TypeError: for any other type, naming what was expected.
    """
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        hint = " (decode bytes with .decode('utf-8') first)" if isinstance(prompts, bytes) else ""
        raise TypeError(f"prompts must be a str or a list/tuple of str, got {type(prompts).__name__}{hint}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts must be a str or a list/tuple of str, but prompts[{i}] is {type(p).__name__}")
    return list(prompts)


def _utf8_cut(data: bytes, limit: int) -> int:
    """Largest ``n <= limit`` such that ``data[:n]`` ends on a UTF-8 character boundary."""
    n = min(limit, len(data))
    # Continuation bytes look like 0b10xxxxxx; never cut just before one.
    while 0 < n < len(data) and (data[n] & 0xC0) == 0x80:
        n -= 1
    return n


class _PaddedTokenizer:
    """What both tokenizers share: ``[BOS, tokens ..., EOS, PAD ...]`` rows of ``max_length`` and batching."""

    max_length: int

    def _frame(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``tokens`` (at most ``max_length - 2`` ids) between BOS and EOS, padded; with its mask."""
        n = len(tokens)
        ids = np.full((self.max_length,), PAD, np.int32)
        ids[0] = BOS
        ids[1 : n + 1] = tokens
        ids[n + 1] = EOS
        mask = np.zeros((self.max_length,), bool)
        mask[: n + 2] = True
        return ids, mask

    def _warn_truncated(self, dropped: str, tail: str) -> None:
        shown = tail if len(tail) <= 200 else tail[:200] + "..."
        warnings.warn(
            f"prompt truncated to {self.max_length} tokens; dropped {dropped}: {json.dumps(shown, ensure_ascii=False)}",
            PromptTruncatedWarning,
            stacklevel=4,
        )

    def tokenize_one(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """One prompt's ``ids`` int32 and ``mask`` bool, both ``(max_length,)``; each tokenizer defines it."""
        raise NotImplementedError

    def __call__(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes a batch (a single str is a batch of one).

        Returns:
          ``ids`` int32 ``(B, max_length)`` and ``mask`` bool ``(B, max_length)``.
        """
        prompts = as_prompt_list(prompts)
        ids = np.full((len(prompts), self.max_length), PAD, np.int32)
        mask = np.zeros((len(prompts), self.max_length), bool)
        for i, p in enumerate(prompts):
            ids[i], mask[i] = self.tokenize_one(p)
        return ids, mask


class ByteTokenizer(_PaddedTokenizer):
    """Byte-level tokenizer: ``[BOS, utf8 bytes + BYTE_OFFSET ..., EOS, PAD ...]``.

    Every prompt is padded (on the right) to exactly ``max_length`` tokens so jitted
    consumers compile once. ``BOS`` and ``EOS`` count towards ``max_length``, so a
    prompt keeps at most ``max_length - 2`` bytes; a longer one is cut on a UTF-8
    character boundary and a ``PromptTruncatedWarning`` names the dropped text. The
    empty prompt (the unconditional prompt) is ``[BOS, EOS]``.

    Attributes:
      max_length: tokens per prompt, including BOS and EOS.
      vocab_size: number of token ids (``VOCAB_SIZE``).
    """

    vocab_size = VOCAB_SIZE

    def __init__(self, max_length: int = 64):
        if not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"max_length must be an int >= 3 (BOS, a byte, EOS), got {max_length!r}")
        self.max_length = max_length

    def tokenize_one(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes one prompt (e.g. in a per-example pipeline transform).

        Returns:
          ``ids`` int32 ``(max_length,)`` and ``mask`` bool ``(max_length,)``.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        data = prompt.encode("utf-8")
        room = self.max_length - 2
        if len(data) > room:
            cut = _utf8_cut(data, room)
            tail = data[cut:].decode("utf-8")
            self._warn_truncated(f"{len(tail)} chars", tail)
            data = data[:cut]
        return self._frame(np.frombuffer(data, np.uint8).astype(np.int32) + BYTE_OFFSET)

    def decode(self, ids: Any) -> str | list[str]:
        """Inverse of tokenization: ``(L,)`` ids give a str, ``(B, L)`` a list of str.

        Reads up to the first ``EOS`` and skips special ids; invalid UTF-8 (e.g. from
        a model's samples) decodes with replacement characters.
        """
        ids = np.asarray(ids)
        if ids.ndim not in (1, 2):
            raise ValueError(f"decode expects ids of shape (L,) or (B, L), got {ids.shape}")
        rows = [self._decode_row(r) for r in np.atleast_2d(ids)]
        return rows[0] if ids.ndim == 1 else rows

    @staticmethod
    def _decode_row(row: np.ndarray) -> str:
        row = row.astype(np.int64)
        end = np.flatnonzero(row == EOS)
        row = row[: end[0]] if end.size else row
        row = row[(row >= BYTE_OFFSET) & (row < BYTE_OFFSET + 256)]
        return (row - BYTE_OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class WordTokenizer(_PaddedTokenizer):
    """Word-level tokenizer with hashed ids: ``[BOS, word ids ..., EOS, PAD ...]``.

    A prompt is lower-cased and split into words (runs of letters, digits and ``'``)
    and single punctuation marks; each piece gets the id ``BYTE_OFFSET + crc32(piece)
    % (vocab_size - BYTE_OFFSET)``. Hashing (fastText's buckets) needs no vocabulary
    file, so any word of any language has an id; two words may share one, which a
    ``vocab_size`` far above the number of distinct words makes rare
    (``colliding(words)`` lists them for a given vocabulary).

    Why words at all: a small encoder trained from scratch with the DiT must first
    learn to assemble words from bytes; with one id per word every word is distinct
    from the first step. In the demo it took direction from 69% to 100% (README,
    Results).

    Padding, ``max_length``, BOS/EOS and truncation (``PromptTruncatedWarning``, at a
    word boundary) behave as in ``ByteTokenizer``; the empty prompt is ``[BOS, EOS]``.
    Ids do not decode back to text.
    """

    _PIECES = re.compile(r"[\w']+|[^\w\s]")

    def __init__(self, max_length: int = 64, vocab_size: int = 4096):
        if not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"max_length must be an int >= 3 (BOS, a word, EOS), got {max_length!r}")
        if not isinstance(vocab_size, int) or vocab_size <= BYTE_OFFSET:
            raise ValueError(f"vocab_size must be an int > {BYTE_OFFSET} (the special ids), got {vocab_size!r}")
        self.max_length = max_length
        self.vocab_size = vocab_size

    def words(self, prompt: str) -> list[str]:
        """The pieces ``prompt`` is split into, lower-cased."""
        return self._PIECES.findall(prompt.lower())

    def word_id(self, word: str) -> int:
        """The id of one piece."""
        return BYTE_OFFSET + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - BYTE_OFFSET)

    def colliding(self, words: Sequence[str]) -> dict[int, list[str]]:
        """Ids shared by more than one of ``words``: ``{id: [words]}`` (empty when all differ)."""
        by_id: dict[int, set[str]] = {}
        for w in words:
            by_id.setdefault(self.word_id(w.lower()), set()).add(w.lower())
        return {i: sorted(ws) for i, ws in by_id.items() if len(ws) > 1}

    def tokenize_one(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes one prompt; returns ``ids`` int32 and ``mask`` bool, both ``(max_length,)``."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        words = self.words(prompt)
        room = self.max_length - 2
        if len(words) > room:
            self._warn_truncated(f"{len(words) - room} words", " ".join(words[room:]))
            words = words[:room]
        return self._frame(np.array([self.word_id(w) for w in words], np.int32))


def tokenizer_id(tokenizer: Any) -> str:
    """A short string that changes whenever ``tokenizer`` maps a prompt to other ids (kind, length, vocabulary)."""
    return f"{type(tokenizer).__name__}(max_length={tokenizer.max_length}, vocab_size={tokenizer.vocab_size})"


# ----------------------------------------------------------------------------- model


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    num_heads: int
    mlp_ratio: float = 4.0
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        # x (B, S, D) is the float32 residual stream; sublayers compute in ``dtype``.
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(param_dtype=self.param_dtype, name="attn_norm")(x).astype(self.dtype)
        attn = MultiHeadAttention(self.num_heads, impl=self.attn_impl, name="attn", **kw)
        x = x + attn(h, mask=mask).astype(jnp.float32)
        h = RMSNorm(param_dtype=self.param_dtype, name="mlp_norm")(x).astype(self.dtype)
        h = MLP(int(x.shape[-1] * self.mlp_ratio), activation="gelu_tanh", name="mlp", **kw)(h)
        return constrain(x + h.astype(jnp.float32), ACT)


class _Embed(nn.Embed):
    """``nn.Embed`` (same parameters) that gathers its table along ``embed`` before the lookup.

    With the table fsdp-split and the ids batch-split, XLA cannot scatter-add the gradient
    into the split table and replicates the whole activation gradient instead ("involuntary
    full rematerialization"). A gathered table, like every fsdp weight, keeps both local.
    """

    def __call__(self, inputs: jax.Array) -> jax.Array:
        table = constrain(jnp.asarray(self.embedding, self.dtype or self.param_dtype), ("vocab", None))
        return jnp.take(table, inputs, axis=0)


class TextTransformer(nn.Module):
    """Small bidirectional transformer over token ids; the pure part of a text encoder.

    ``__call__(ids, mask) -> emb``: token embedding plus a learned position table,
    ``depth`` pre-norm blocks whose self-attention ignores padded keys, and a final
    RMSNorm. Padded positions of ``emb`` are exactly zero, as with umT5's padded
    outputs, so a consumer that ignores the mask sees zeros there.

    Attributes:
      vocab_size: rows of the token embedding (at least the tokenizer's vocab; round
        it up when the ``vocab`` axis is sharded).
      max_length: rows of the position table; inputs may be shorter.
      width: embedding width ``D``.
      depth: number of blocks.
      num_heads: attention heads; must divide ``width``.
      mlp_ratio: MLP hidden width over ``width``.
      dtype: compute dtype of matmuls and of the returned embeddings; the residual
        stream, norms and softmax stay float32.
      param_dtype: dtype of parameters.
      attn_impl: a backend of ``vdit.attention.attention``.
    """

    vocab_size: int = VOCAB_SIZE
    max_length: int = 64
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attn_impl: str = "xla"

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Embeds ``ids (B, S)`` with key padding ``mask (B, S)``; returns ``(B, S, width)`` in ``dtype``."""
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"expected ids and mask of equal shape (B, S), got {ids.shape} and {mask.shape}")
        if ids.shape[1] > self.max_length:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_length {self.max_length}")
        if self.width % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide width {self.width}")
        # Concrete ids only: under jit no error can be raised (see the `where` below).
        concrete = isinstance(ids, np.ndarray) or (
            isinstance(ids, jax.Array) and not isinstance(ids, jax.core.Tracer) and ids.is_fully_addressable)
        if concrete and ids.size:
            low, high = int(np.min(ids)), int(np.max(ids))
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"token ids must be in [0, vocab_size={self.vocab_size}), got ids from {low} to "
                                 f"{high}; tokenize with the encoder's own tokenizer")
        mask = mask.astype(bool)
        # Padded slots never read their id, and a real id out of range (a negative one too, which
        # a gather would wrap to a valid row) reads row vocab_size, which the lookup fills with NaN:
        # a loud output rather than a plausible, wrong embedding.
        ids = jnp.where(mask, jnp.where((ids < 0) | (ids >= self.vocab_size), self.vocab_size, ids), 0)
        embed = _Embed(
            self.vocab_size,
            self.width,
            dtype=jnp.float32,  # a lookup, not a matmul: start the residual stream in f32
            param_dtype=self.param_dtype,
            embedding_init=partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embed",
        )
        pos = self.param(
            "pos_embed",
            partitioned(nn.initializers.normal(0.02), (None, "embed")),
            (self.max_length, self.width),
            self.param_dtype,
        )
        x = embed(ids) + pos[None, : ids.shape[1]].astype(jnp.float32)  # (B, S, D)
        x = constrain(x, ACT)
        for i in range(self.depth):
            x = EncoderBlock(
                self.num_heads,
                self.mlp_ratio,
                self.attn_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"block_{i}",
            )(x, mask)
        x = RMSNorm(param_dtype=self.param_dtype, name="final_norm")(x)
        # Zero padded positions so outputs do not depend on what the padding holds.
        x = jnp.where(mask[..., None], x, 0.0).astype(self.dtype)
        return constrain(x, ACT)


# ----------------------------------------------------------------------------- interface


@runtime_checkable
class TextEncoder(Protocol):
    """What the DiT, training and sampling need from a text encoder.

    Attributes:
      max_length: tokens per prompt ``L`` (fixed, so consumers compile once).
      width: embedding width ``D``.
      tokenizer: the host-side tokenizer the data pipeline runs on captions:
        ``tokenizer(prompts) -> (ids, mask)``, with ``max_length`` and ``vocab_size``
        (``tokenizer_id`` stamps cached latents with them).
    """

    max_length: int
    width: int
    tokenizer: Any

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Host-side: prompts -> ``ids`` int32 ``(B, L)``, ``mask`` bool ``(B, L)``."""
        ...

    def init(self, key: jax.Array) -> Params:
        """Parameters, with logical axis metadata; pure in ``key`` (jit/eval_shape-able)."""
        ...

    def apply(self, params: Params, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Pure and jittable: ``(ids, mask) -> emb (B, L, D)``, zero where ``mask`` is False."""
        ...

    def encode(self, params: Params, prompts: str | Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """Convenience: tokenize then apply; returns ``(emb (B, L, D), mask (B, L))``."""
        ...


class TransformerTextEncoder:
    """The built-in ``TextEncoder``: a tokenizer + ``TextTransformer``.

    Args:
      max_length: tokens per prompt, including BOS and EOS.
      width, depth, num_heads, mlp_ratio, dtype, param_dtype, attn_impl: see
        ``TextTransformer``.
      vocab_size: embedding rows. Bytes: at least ``VOCAB_SIZE`` (the default); words:
        the number of hash buckets (default 4096).
      tokenizer: ``"bytes"`` (``ByteTokenizer``) or ``"words"`` (``WordTokenizer``).

    Example::

      enc = TransformerTextEncoder(max_length=32, width=128, depth=2)
      params = enc.init(jax.random.key(0))
      emb, mask = enc.encode(params, ["a red circle moving left", ""])
    """

    def __init__(
        self,
        max_length: int = 64,
        width: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        attn_impl: str = "xla",
        vocab_size: int | None = None,
        tokenizer: str = "bytes",
    ):
        if tokenizer == "bytes":
            self.tokenizer = ByteTokenizer(max_length)
            vocab_size = VOCAB_SIZE if vocab_size is None else vocab_size
            if vocab_size < VOCAB_SIZE:
                raise ValueError(f"vocab_size must be >= {VOCAB_SIZE} (the byte tokenizer's), got {vocab_size}")
        elif tokenizer == "words":
            self.tokenizer = WordTokenizer(max_length, **({} if vocab_size is None else {"vocab_size": vocab_size}))
            vocab_size = self.tokenizer.vocab_size
        else:
            raise ValueError(f"unknown tokenizer {tokenizer!r}; expected 'bytes' or 'words'")
        if width % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide width {width}")
        if attn_impl not in BACKENDS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; expected one of {BACKENDS}")
        self.module = TextTransformer(
            vocab_size=vocab_size,
            max_length=max_length,
            width=width,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            dtype=dtype,
            param_dtype=param_dtype,
            attn_impl=attn_impl,
        )
        self._apply_jit = jax.jit(self.apply)

    @property
    def max_length(self) -> int:
        """Tokens per prompt ``L``."""
        return self.tokenizer.max_length

    @property
    def width(self) -> int:
        """Embedding width ``D``."""
        return self.module.width

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """See ``ByteTokenizer.__call__``."""
        return self.tokenizer(prompts)

    def decode(self, ids: Any) -> str | list[str]:
        """See ``ByteTokenizer.decode``; hashed word ids do not decode (a TypeError says so)."""
        if not hasattr(self.tokenizer, "decode"):
            raise TypeError(f"{type(self.tokenizer).__name__} ids are hashed and do not decode back to text; "
                            "only tokenizer='bytes' decodes")
        return self.tokenizer.decode(ids)

    def init(self, key: jax.Array) -> Params:
        """Returns the ``params`` collection (``nn.Partitioned`` leaves carry logical axes)."""
        ids = jnp.zeros((1, self.max_length), jnp.int32)
        return self.module.init(key, ids, jnp.ones(ids.shape, bool))["params"]

    def apply(self, params: Params, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Pure forward pass ``(ids, mask) -> emb (B, L, width)``; boxed or unboxed params."""
        return self.module.apply({"params": params}, ids, mask)

    def encode(self, params: Params, prompts: str | Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """Tokenizes on the host, then runs a jitted ``apply``; returns ``(emb, mask)``."""
        ids, mask = self.tokenize(prompts)
        return self._apply_jit(params, ids, mask), jnp.asarray(mask)
