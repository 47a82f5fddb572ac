"""vdit's DiT reproduces diffusers' WanTransformer3DModel (Wan2.1) after weight conversion."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from vdit.convert.wan_dit import convert_wan_dit  # noqa: E402
from vdit.dit import DiT, count_params  # noqa: E402

# diffusers' own test size for WanTransformer3DModel, then ours: non-square, odd frame
# count, more heads and layers, a 2-frame temporal patch.
DIFFUSERS_TEST = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
OURS = dict(
    patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=6, out_channels=6,
    text_dim=24, freq_dim=64, ffn_dim=80, num_layers=3, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
)
TEMPORAL_PATCH = dict(OURS, patch_size=(2, 2, 2), cross_attn_norm=False, num_layers=2)
CASES = {
    "diffusers_test": (DIFFUSERS_TEST, (1, 4, 2, 16, 16), 12),
    "nonsquare_5_frames": (OURS, (2, 6, 5, 12, 20), 7),
    "temporal_patch": (TEMPORAL_PATCH, (2, 6, 4, 8, 14), 5),
}


def _wan(config, seed=0):
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**config).eval()
    with torch.no_grad():  # perturb every weight so zero/one inits cannot hide a mismatch
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("scan", [False, True])
def test_wan_transformer_parity(case, scan):
    config, shape, text_len = CASES[case]
    wan = _wan(config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)  # (B, C, T, H, W) torch layout
    t = torch.tensor([999.0, 137.0][: shape[0]])
    text = torch.randn(shape[0], text_len, config["text_dim"], generator=g)
    with torch.no_grad():
        ref = wan(x, t, text, return_dict=False)[0].numpy()

    kwargs, params = convert_wan_dit(wan, scan_layers=scan)
    dit = DiT(**kwargs, scan_layers=scan)
    out = jax.jit(dit.apply)(
        {"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1)), jnp.asarray(t.numpy() / 1000.0),
        jnp.asarray(text.numpy()),
    )
    err = float(np.abs(np.asarray(out).transpose(0, 4, 1, 2, 3) - ref).max())
    print(f"{case} scan={scan}: max abs diff {err:.2e} (|ref| max {np.abs(ref).max():.2f})")
    assert err <= 1e-4

    # The converted tree is exactly the tree DiT.init builds: nothing missing, nothing extra.
    shapes = jax.eval_shape(dit.init, jax.random.PRNGKey(0), jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1)),
                            jnp.zeros(shape[0]), jnp.asarray(text.numpy()))
    want = jax.tree.map(lambda a: a.shape, nn.meta.unbox(shapes["params"]))
    assert jax.tree.map(np.shape, params) == want
    assert count_params(params) == sum(p.numel() for p in wan.parameters())


def test_converter_rejects_incomplete_and_foreign_checkpoints():
    wan = _wan(DIFFUSERS_TEST)
    state = dict(wan.state_dict())
    missing = {k: v for k, v in state.items() if k != "blocks.1.attn2.to_k.weight"}
    with pytest.raises(ValueError, match="missing 'blocks.1.attn2.to_k.weight'"):
        convert_wan_dit(missing, DIFFUSERS_TEST)
    extra = dict(state, **{"blocks.2.attn1.to_q.weight": state["blocks.0.attn1.to_q.weight"]})
    with pytest.raises(ValueError, match="1 unexpected keys"):
        convert_wan_dit(extra, DIFFUSERS_TEST)
    with pytest.raises(ValueError, match="image_dim"):
        convert_wan_dit(state, dict(DIFFUSERS_TEST, image_dim=1280))
    with pytest.raises(ValueError, match=r"Wan config has patch_size=2: expected three positive integers \[t, h, w\]"):
        convert_wan_dit(state, dict(DIFFUSERS_TEST, patch_size=2))
    with pytest.raises(ValueError, match=r"Wan config has num_layers='2': expected a positive integer"):
        convert_wan_dit(state, dict(DIFFUSERS_TEST, num_layers="2"))
