"""Memory of a compiled step (``memory_analysis``) and its analytic estimate per remat policy.

The estimate of a DiT train step (bytes; ``P`` parameters of ``p`` bytes, ``c`` bytes
per compute-dtype value, ``T = B S`` tokens, ``H`` heads, ``L`` text tokens):

* **state** (the step's donated arguments): params, two Adam moments and the EMA,
  ``(3 + ema) P p``;
* **temp** (XLA's scratch): the gradients and one update-sized buffer ``2 P p``, plus
  the activations autodiff keeps for the backward pass, per block:

  ========  ==================================================================
  policy    kept per block
  ========  ==================================================================
  ``none``  everything a block's backward reads: the f32 residual at its three
            norms ``3 T D 4``; the inputs and outputs of every projection and norm
            (self-attention ``9 T D c``, cross-attention ``5 T D c + 3 B L D c``, MLP
            ``T D c + 2 T M c``); the attention probabilities ``B H S^2 (4 + c)``
            (``xla``; ``chunked`` keeps the log-sum-exp ``B H S 4`` instead) and
            ``B H S L (4 + c)`` of cross-attention
  ``dots``  the block input ``T D 4`` and every projection's output (no batch dims):
            ``8 T D c + 2 B L D c + T M c``
  ``full``  the block input ``T D 4``
  ========  ==================================================================

  With ``dots`` or ``full`` one block's ``none`` set is rebuilt during its backward,
  so it is added once. The attention backward's own scratch is added once too:
  three score-sized f32 arrays (``xla``: ``B H S^2``; ``chunked``: ``B H S x 512``).

It is an estimate of what autodiff must keep, before XLA fuses or copies anything:
the measured/estimate ratio says how far the compiler strays from it.
"""

from __future__ import annotations

import jax.numpy as jnp

CHUNKED_BLOCK = 512  # key block of the chunked backend (vdit.attention's default block_kv)


def memory_stats(compiled) -> dict[str, int]:
    """Byte counts of ``compiled.memory_analysis()``; ``peak`` = arguments + outputs - aliased + temp."""
    m = compiled.memory_analysis()
    if m is None:
        raise ValueError("this backend's compiler reports no memory analysis")
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
    }
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def _block_bytes(dit, batch: int, seq: int, text_len: int, policy: str) -> float:
    """Bytes one block keeps for its backward under ``policy`` (see module doc)."""
    c = jnp.dtype(dit.dtype).itemsize
    b, s, l_, d, m, h = batch, seq, text_len, dit.width, dit.mlp_dim, dit.num_heads
    t = b * s
    if policy == "full":
        return 4.0 * t * d
    if policy == "dots":
        return 4.0 * t * d + c * (8 * t * d + 2 * b * l_ * d + t * m)
    scores = b * h * s * s * (4 + c) if dit.attention_impl == "xla" else 4 * b * h * s
    return (12.0 * t * d + c * (9 * t * d + 5 * t * d + 3 * b * l_ * d + t * d + 2 * t * m)
            + scores + b * h * s * l_ * (4 + c))


def activation_bytes(dit, batch: int, seq: int, text_len: int) -> float:
    """Estimated activation bytes of a DiT train step under ``dit.remat`` (see module doc)."""
    policy = dit.remat
    if policy not in ("none", "dots", "full"):
        raise ValueError(f"no memory estimate for remat policy {policy!r}; expected none, dots or full")
    kept = dit.depth * _block_bytes(dit, batch, seq, text_len, policy)
    if policy != "none":
        kept += _block_bytes(dit, batch, seq, text_len, "none")
    keys = seq if dit.attention_impl == "xla" else min(seq, CHUNKED_BLOCK)
    return kept + 3 * 4.0 * batch * dit.num_heads * seq * keys


def train_memory_estimate(dit, num_params: int, batch: int, seq: int, text_len: int, *, ema: bool = True) -> dict:
    """Analytic bytes of a DiT train step: ``state`` (arguments) and ``temp`` (grads, update, activations)."""
    p = jnp.dtype(dit.param_dtype).itemsize
    state = (3 + int(ema)) * num_params * p
    activations = activation_bytes(dit, batch, seq, text_len)
    return {"state_bytes": int(state), "grad_bytes": int(2 * num_params * p), "activation_bytes": int(activations),
            "temp_bytes": int(2 * num_params * p + activations)}
