"""The peer: the same DiT as diffusers' ``WanTransformer3DModel`` in PyTorch, trained the same way.

The torch model is built from the vdit DiT's hyperparameters through
``vdit.convert.wan_dit.wan_config_from_dit`` (the inverse of the converter's own
mapping, checked against it), and ``peer_parity`` proves it is the same network:
equal parameter counts, and equal outputs once its weights are converted into vdit.

A peer train step does what vdit's does: flow-matching loss (logit-normal t),
forward, backward, global-norm clipping, AdamW (weight decay on matrices only) and
an EMA update. torch is imported lazily: it is an optional dependency
(``pip install "vdit[convert]"``), needed only for ``--peer``.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vdit.bench.timing import GEMM_SIZES, measure


def _torch():
    try:
        import diffusers
        import torch
    except ImportError as e:
        raise ValueError(f"the diffusers peer needs torch and diffusers ({e.name} is missing): "
                         "pip install 'vdit[convert]'") from e
    return torch, diffusers


def peer_device() -> str:
    """The torch device on JAX's platform: ``cpu``, or ``cuda`` when JAX runs on a GPU torch can use."""
    torch, _ = _torch()
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    if backend == "gpu" and torch.cuda.is_available():
        return "cuda"
    raise ValueError(f"the diffusers peer runs on the device JAX uses ({backend}), but this torch "
                     f"({torch.__version__}) cannot reach it; compare on CPU or install torch for it")


@contextlib.contextmanager
def torch_threads(n: int):
    """Runs torch with ``n`` intra-op threads (the cores XLA:CPU uses), then restores the old count."""
    torch, _ = _torch()
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_peer(dit, *, seed: int = 0):
    """diffusers' ``WanTransformer3DModel`` with ``dit``'s architecture, freshly initialised (float32)."""
    from vdit.convert.wan_dit import wan_config_from_dit

    torch, diffusers = _torch()
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(**wan_config_from_dit(dit))


def peer_parity(dit, model, *, text_len: int = 8, seed: int = 0) -> dict:
    """Checks that the torch ``model`` is ``dit``'s network: parameter counts and outputs after conversion.

    Converts the torch weights with ``vdit.convert.wan_dit.convert_wan_dit`` and runs
    both in float32 on a small input (the architecture does not depend on the shape).

    Returns:
      ``{"params_vdit", "params_peer", "max_abs_diff", "max_abs_out"}``; ``params_vdit``
      counts the parameters ``dit.init`` creates (not the converted tree).
    """
    from vdit.convert.wan_dit import convert_wan_dit
    from vdit.dit import count_params

    torch, _ = _torch()
    pt, ph, pw = dit.patch_size
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2 * pt, 2 * ph, 2 * pw, dit.in_channels)).astype(np.float32)
    t = np.array([0.37], np.float32)
    text = rng.standard_normal((1, text_len, dit.text_dim)).astype(np.float32)
    ref_dit = dit.clone(dtype=jnp.float32, attention_impl="xla", remat="none")
    init_shapes = jax.eval_shape(ref_dit.init, jax.random.PRNGKey(0), x, t, text)
    _, params = convert_wan_dit(model.float(), scan_layers=ref_dit.scan_layers)
    ours = np.asarray(jax.jit(ref_dit.apply)({"params": params}, x, t, text))
    device = next(model.parameters()).device
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 4, 1, 2, 3)).to(device), torch.from_numpy(t * 1000.0).to(device),
                    torch.from_numpy(text).to(device), return_dict=False)[0]
    ref = ref.float().cpu().numpy().transpose(0, 2, 3, 4, 1)
    return {"params_vdit": count_params(init_shapes["params"]),
            "params_peer": int(sum(p.numel() for p in model.parameters())),
            "max_abs_diff": float(np.abs(ours - ref).max()), "max_abs_out": float(np.abs(ref).max())}


def torch_gemm_peak(dtype: str = "float32", *, repeats: int = 5) -> dict:
    """The best square-GEMM FLOP/s of torch on the peer's device (same sizes as ``timing.gemm_peak``)."""
    torch, _ = _torch()
    device = peer_device()
    tdtype = getattr(torch, dtype)
    by_size = {}
    for n in GEMM_SIZES.get(jax.default_backend(), GEMM_SIZES["gpu"]):
        a = torch.randn(n, n, device=device, dtype=tdtype)
        b = torch.randn(n, n, device=device, dtype=tdtype)
        timing = measure(lambda: _synced(torch, device, a @ b), warmup=1, repeats=repeats)
        by_size[n] = 2.0 * n**3 / timing.median
    best = max(by_size, key=by_size.get)
    return {"dtype": dtype, "flops_per_s": by_size[best], "n": best, "by_size": by_size}


def torch_matmul_times(matmuls: list, *, threads: int, warmup: int = 1, repeats: int = 5) -> list[float]:
    """Median seconds of each ``vdit.bench.floor.Matmul`` run by ``torch.einsum`` on the peer's device.

    Random operands of the matmul's shapes and dtypes (both cast to their common dtype:
    torch has no mixed-dtype einsum, and XLA widens such a matmul too); timed
    round-robin with ``threads`` intra-op threads. The output shape is checked against
    ``dot_general``'s, so a wrong translation fails rather than times something else.
    """
    from vdit.bench.timing import measure_interleaved

    torch, _ = _torch()
    device = peer_device()
    gen = torch.Generator().manual_seed(0)
    runs = {}
    for i, mm in enumerate(matmuls):
        dtype = getattr(torch, str(jnp.promote_types(mm.lhs[1], mm.rhs[1])))
        a, b = (torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s, _ in (mm.lhs, mm.rhs))
        spec = mm.einsum_spec()
        want = jax.eval_shape(mm.fn, *(jax.ShapeDtypeStruct(s, jnp.dtype(d)) for s, d in (mm.lhs, mm.rhs))).shape
        got = tuple(torch.einsum(spec, a, b).shape)
        if got != tuple(want):
            raise AssertionError(f"torch.einsum({spec!r}) of {mm.label()} gives shape {got}, dot_general {want}")
        runs[i] = functools.partial(lambda spec, a, b: _synced(torch, device, torch.einsum(spec, a, b)), spec, a, b)
    with torch_threads(threads):
        timings = measure_interleaved(runs, warmup=warmup, repeats=repeats)
    return [timings[i].median for i in range(len(matmuls))]


def _synced(torch, device, out):
    if device == "cuda":
        torch.cuda.synchronize()
    return out


def peer_train_step(model, latents: np.ndarray, text: np.ndarray, *, optim, ema_decay: float, dtype: str):
    """A zero-argument callable running one diffusers train step (vdit's step, in torch).

    Args:
      model: the peer ``WanTransformer3DModel``.
      latents: ``(B, t, h, w, c)`` clean latents (vdit layout; transposed here).
      text: ``(B, L, text_dim)`` text embeddings.
      optim: vdit's ``optim`` config section (lr, betas, weight decay, clip norm).
      ema_decay: EMA decay of the parameter average.
      dtype: compute dtype, ``float32`` or ``bfloat16`` (autocast, parameters stay f32).
    """
    torch, _ = _torch()
    device = peer_device()
    model = model.to(device).float().train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.b1, optim.b2), eps=1e-8, fused=True)
    ema = [p.detach().clone() for p in params]
    z = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 4, 1, 2, 3))).to(device)
    ctx = torch.from_numpy(text).to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        t = torch.sigmoid(torch.randn(z.shape[0], device=device))  # logit-normal, as vdit samples
        eps = torch.randn_like(z)
        tb = t.view(-1, 1, 1, 1, 1)
        with autocast:
            pred = model((1 - tb) * z + tb * eps, t * 1000.0, ctx, return_dict=False)[0]
        loss = torch.mean(torch.square(pred.float() - (eps - z)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim.clip_norm, foreach=True)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - ema_decay)
        return _synced(torch, device, loss.detach())

    return step
