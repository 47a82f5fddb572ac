"""`vdit convert` on a diffusers pipeline folder (safetensors, bf16 and f32) without torch in the loop."""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from vdit.cli import main  # noqa: E402
from vdit.convert import load_converted  # noqa: E402
from vdit.vae import CausalVAE  # noqa: E402

DIT = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0])


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("wan")
    dit = diffusers.WanTransformer3DModel(**DIT).eval()
    vae = diffusers.AutoencoderKLWan(**VAE).eval()
    dit.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    return root, dit, vae


def test_convert_cli_round_trip(pipeline_folder, tmp_path, capsys):
    root, dit, vae = pipeline_folder
    out = tmp_path / "converted"
    assert main(["convert", "--src", str(root), "--out", str(out)]) == 0
    assert "transformer" in capsys.readouterr().out

    module, params = load_converted(out / "transformer")
    x, t, text = torch.randn(1, 4, 3, 8, 12), torch.tensor([700.0]), torch.randn(1, 5, 16)
    with torch.no_grad():
        ref = dit(x, t, text, return_dict=False)[0].numpy()
    got = module.apply({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1)), jnp.asarray([0.7]),
                       jnp.asarray(text.numpy()))
    assert np.abs(np.asarray(got).transpose(0, 4, 1, 2, 3) - ref).max() <= 1e-4

    module, params = load_converted(out / "vae")
    assert isinstance(module, CausalVAE) and module.latents_std == (1.5, 2.0, 0.5, 1.0)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        ref = vae.encode(video).latent_dist.mean.numpy()
    got = module.apply({"params": params}, jnp.asarray(video.numpy().transpose(0, 2, 3, 4, 1)), normalize=False,
                       method=CausalVAE.encode)
    assert np.abs(np.asarray(got.mean).transpose(0, 4, 1, 2, 3) - ref).max() <= 1e-3

    # Converting again into the same folder must not silently replace the user's files.
    assert main(["convert", "--src", str(root), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bf16_checkpoint_converts(pipeline_folder, tmp_path):
    root, dit, _ = pipeline_folder
    dit16 = diffusers.WanTransformer3DModel(**DIT).to(torch.bfloat16)
    dit16.load_state_dict({k: v.to(torch.bfloat16) for k, v in dit.state_dict().items()})
    dit16.save_pretrained(tmp_path / "bf16")
    assert main(["convert", "--src", str(tmp_path / "bf16"), "--out", str(tmp_path / "out")]) == 0
    _, params = load_converted(tmp_path / "out" / "transformer")
    want = dit16.state_dict()["blocks.0.attn1.to_q.weight"].float().numpy().T
    np.testing.assert_array_equal(params["blocks_0"]["self_attn"]["q"]["linear"]["kernel"], want)


def test_not_a_diffusers_folder(tmp_path, capsys):
    assert main(["convert", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "neither a diffusers model" in capsys.readouterr().err
    assert main(["convert", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert f"--src {tmp_path / 'nope'} does not exist; expected a diffusers model folder" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    assert main(["convert", "--src", str(tmp_path / "f"), "--out", str(tmp_path / "o")]) == 2
    assert f"--src {tmp_path / 'f'} is a file, expected a diffusers model folder" in capsys.readouterr().err


def test_a_broken_part_stops_the_conversion_before_anything_is_written(pipeline_folder, tmp_path, capsys):
    root, _, _ = pipeline_folder
    src = tmp_path / "src"
    shutil.copytree(root, src)
    weights = next((src / "vae").glob("*.safetensors"))
    os.truncate(weights, 4)  # an interrupted download
    out = tmp_path / "out"
    assert main(["convert", "--src", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{weights} is not a readable safetensors file" in err
    assert not out.exists()  # the transformer, first and fine, was not written either

    (src / "vae" / "config.json").write_text("{'_class_name': 'AutoencoderKLWan'")
    assert main(["convert", "--src", str(src), "--out", str(out)]) == 2
    assert f"{src / 'vae' / 'config.json'} is not valid JSON" in capsys.readouterr().err
    assert not out.exists()


def test_overwrite_replaces_a_part_only_once_the_new_one_is_complete(pipeline_folder, tmp_path):
    root, _, _ = pipeline_folder
    out = tmp_path / "out"
    assert main(["convert", "--src", str(root / "vae"), "--out", str(out)]) == 0
    (out / "vae" / "stale.txt").write_text("from the previous conversion")
    assert main(["convert", "--src", str(root / "vae"), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["vae"] and not (out / "vae" / "stale.txt").exists()
    module, _ = load_converted(out / "vae")
    assert isinstance(module, CausalVAE)
