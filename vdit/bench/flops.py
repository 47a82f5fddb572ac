"""Analytic model FLOPs of the DiT, and their cross-check with XLA's cost analysis.

The formula (one forward pass; ``S`` tokens per example, width ``D``, MLP width ``M``,
``L`` text tokens of width ``E``, ``P_in``/``P_out`` values per patch, ``F`` the
sinusoidal width, ``N`` blocks; a matmul of ``(m, k) x (k, n)`` is ``2 m k n``):

=====================  =====================================  ============
component              FLOPs per example                      acts per
=====================  =====================================  ============
patch_embed            2 S P_in D                             token
self_attn_proj         N * 8 S D^2      (q, k, v, out)        token
self_attn_scores       N * 4 S^2 D      (QK^T and PV)         token pair
cross_attn_proj        N * (4 S D^2 + 4 L D^2)  (q, out; k, v) token / text token
cross_attn_scores      N * 4 S L D                            token x text token
mlp                    N * 4 S D M                            token
proj_out               2 S D P_out                            token
text_embed             2 L (E D + D^2)                        text token
adaln                  2 (F D + D^2 + 6 D^2)                  **example**
=====================  =====================================  ============

adaLN modulation comes from the timestep, one per example, so it is counted once
per example and not per token. Training is ``3 x`` forward (the backward pass costs
two forward matmuls per forward matmul: input and weight gradients); recomputation
under remat is *not* model FLOPs. Elementwise work (norms, softmax, RoPE, GELU) is
left out: it is not what a matrix unit measures.

XLA's ``cost_analysis`` counts every op, elementwise ones too, and counts a loop body
once whatever its trip count: the cross-check therefore compiles the *unrolled* model
(``scan_layers=False``) with the ``xla`` attention backend (``chunked`` scans over key
blocks; ``cudnn``/``splash`` are custom calls whose FLOPs XLA cannot see) and no remat.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vdit.bench.timing import compile_timed
from vdit.sharding import unbox

TRAIN_FACTOR = 3  # forward + backward (input and weight gradients)


def tokens_per_example(dit, latent_shape: tuple[int, ...]) -> int:
    """DiT tokens of one example with latents ``(t, h, w, c)``."""
    t, h, w = latent_shape[:3]
    pt, ph, pw = dit.patch_size
    return (t // pt) * (h // ph) * (w // pw)


def dit_forward_flops(dit, latent_shape: tuple[int, ...], text_len: int, batch: int = 1) -> dict[str, float]:
    """Matmul FLOPs of one DiT forward pass over ``batch`` examples, by component (see module doc).

    Args:
      dit: a ``vdit.dit.DiT`` (only its hyperparameters are read).
      latent_shape: latents of one example ``(t, h, w, c)``.
      text_len: text tokens per example.
      batch: examples.
    """
    s, d, m, n, l_ = tokens_per_example(dit, latent_shape), dit.width, dit.mlp_dim, dit.depth, text_len
    patch = dit.patch_size[0] * dit.patch_size[1] * dit.patch_size[2]
    p_in, p_out = patch * latent_shape[3], patch * (dit.out_channels or dit.in_channels)
    per_example = {
        "patch_embed": 2 * s * p_in * d,
        "self_attn_proj": n * 8 * s * d * d,
        "self_attn_scores": n * 4 * s * s * d,
        "cross_attn_proj": n * (4 * s * d * d + 4 * l_ * d * d),
        "cross_attn_scores": n * 4 * s * l_ * d,
        "mlp": n * 4 * s * d * m,
        "proj_out": 2 * s * d * p_out,
        "text_embed": 2 * l_ * (dit.text_dim * d + d * d),
        "adaln": 2 * (dit.freq_dim * d + d * d + 6 * d * d),
    }
    return {k: float(batch * v) for k, v in per_example.items()}


def xla_flops(compiled) -> float:
    """The ``flops`` XLA's cost analysis assigns to a compiled executable."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost or "flops" not in cost:
        raise ValueError("XLA's cost analysis reports no 'flops' on this backend")
    return float(cost["flops"])


def cross_check(dit, latent_shape: tuple[int, ...], text_len: int, batch: int = 1, *, train: bool = False) -> dict:
    """Analytic FLOPs against XLA's count for the unrolled DiT (forward, or forward + backward).

    Only compiles (abstract inputs; nothing is allocated or run). ``train`` takes the
    gradient of a mean-square loss with respect to the parameters, as a train step
    does, and compares with ``TRAIN_FACTOR x`` the forward count.

    Returns:
      ``{"mode", "analytic", "xla", "ratio" (xla / analytic), "compile_s"}``.
    """
    model = dit.clone(scan_layers=False, remat="none", attention_impl="xla")
    f32 = jnp.float32
    x = jax.ShapeDtypeStruct((batch, *latent_shape), f32)
    t = jax.ShapeDtypeStruct((batch,), f32)
    text = jax.ShapeDtypeStruct((batch, text_len, dit.text_dim), f32)
    mask = jax.ShapeDtypeStruct((batch, text_len), jnp.bool_)
    params = unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, text, mask)["params"])

    def forward(p, x, t, text, mask):
        return model.apply({"params": p}, x, t, text, mask)

    fn = jax.grad(lambda p, *a: jnp.mean(jnp.square(forward(p, *a)))) if train else forward
    compiled, seconds = compile_timed(jax.jit(fn), params, x, t, text, mask)
    analytic = sum(dit_forward_flops(dit, latent_shape, text_len, batch).values()) * (TRAIN_FACTOR if train else 1)
    xla = xla_flops(compiled)
    return {"mode": "train" if train else "forward", "analytic": analytic, "xla": xla, "ratio": xla / analytic,
            "compile_s": seconds}
