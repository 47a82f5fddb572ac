"""vdit.analyzer and vdit.evaluate: the pixel analyzer is right on real clips and refuses to
guess on crafted negatives; adherence, consistency, PSNR and Fréchet math; eval.json schema."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vdit import analyzer as an
from vdit import evaluate as ev
from vdit import frechet as fr
from vdit.data import moving_shapes as ms
from vdit.data import open_dataset, prepare_moving_shapes
from vdit.vae import CausalVAE, DiagonalGaussian

SIZES = {"f17_r32": dict(frames=17, resolution=32), "f5_r16": dict(frames=5, resolution=16)}
ROTATE = [1, 2, 0]  # RGB -> GBR maps every palette colour to another one: red->blue, yellow->magenta ...


def _blur(x, sigma):
    """Separable Gaussian blur over H and W of (N, T, H, W, C) float32 (zero padding)."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    for ax in (2, 3):
        pad = [(0, 0)] * x.ndim
        pad[ax] = (r, r)
        p = np.moveaxis(np.pad(x, pad), ax, 0)
        out = sum(k[i] * p[i : i + x.shape[ax]] for i in range(2 * r + 1))
        x = np.moveaxis(out, 0, ax)
    return x


def _degrade(video, seed=0, sigma=0.8, shift=40, dim=0.8, ghost=0.12, noise=6.0):
    """What a VAE/generator does to a clip: blur, dimming, colour cast, a faint ghost, noise."""
    rng = np.random.default_rng(seed)
    x = _blur(video.astype(np.float32), sigma) * dim
    mix = np.eye(3) + rng.uniform(0, shift / 255, (len(video), 3, 3))  # per clip: leak into the off channels
    x = np.matmul(x.reshape(len(x), -1, 3), mix.transpose(0, 2, 1).astype(np.float32)).reshape(video.shape)
    x += ghost * np.roll(video.astype(np.float32), (5, 7), axis=(2, 3))
    x += rng.normal(0, noise, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", params=list(SIZES))
def real(request, tmp_path_factory):
    """Validation and heldout clips of a variant, built with prepare_moving_shapes and read back."""
    kw = SIZES[request.param]
    root = tmp_path_factory.mktemp("ms")
    name = prepare_moving_shapes(root, num_train=8, num_validation=600, num_heldout=200, progress=False,
                                 num_threads=0, **kw)
    out = {"name": request.param}
    for split in ("validation", "heldout"):
        ds = open_dataset(name, root, split)
        recs = [ds.source[i] for i in range(len(ds))]
        out[split] = dict(
            video=np.stack([r["video"] for r in recs]),
            caption=[r["caption"].decode() for r in recs],
            **{k: np.array([r[k] for r in recs]) for k in ("color", "shape", "direction")},
        )
    return out


# ----------------------------------------------------------------------------- analyzer on real clips


def test_analyzer_accuracy_on_real_clips(real):
    for split in ("validation", "heldout"):
        d = real[split]
        a = an.analyze_videos(d["video"])
        assert (a.status == "ok").all()
        acc = {k: float((getattr(a, k) == d[k]).mean()) for k in ("color", "shape", "direction")}
        print(real["name"], split, len(a), acc)
        assert min(acc.values()) >= 0.99, acc


def test_analyzer_robust_to_degradation(real):
    # Blur, colour cast, dimming, a faint ghost and noise, as VAE/generation leaves them.
    d = real["validation"]
    a = an.analyze_videos(_degrade(d["video"]))
    acc = {k: float((getattr(a, k) == d[k]).mean()) for k in ("color", "shape", "direction")}
    print(real["name"], "degraded", acc)
    floor = 0.99 if real["name"] == "f17_r32" else 0.95  # 4-7 px shapes blurred by 0.8 px are blobs
    assert acc["color"] >= 0.99 and acc["direction"] >= 0.99 and acc["shape"] >= floor, acc


def test_float_input_and_chunking_agree():
    v, _ = ms.render_clips("validation", np.arange(40), frames=5, resolution=16)
    a = an.analyze_videos(v)
    b = an.analyze_videos(v.astype(np.float32) / 127.5 - 1, an.AnalyzerConfig(chunk=7))
    for k in ("status", "color", "shape", "direction", "frame_objects"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    np.testing.assert_allclose(a.travel, b.travel, atol=1e-6)


def test_result_dict_is_json():
    v, p = ms.render_clips("heldout", [0])
    r = an.analyze_video(v[0])
    assert r["status"] == "ok" and r["color"] == ms.COLORS[p["color"][0]]
    assert {"shape", "direction", "fg_fraction", "num_components", "speed", "travel_px", "confidence"} <= set(r)
    json.dumps(r, allow_nan=False)


def test_label_components():
    mask = np.zeros((2, 8, 8), bool)
    mask[0, 1:3, 1:3] = True
    mask[0, 3, 3] = True  # diagonal neighbour: same 8-connected component
    mask[0, 6:8, 5:8] = True
    mask[1, :, 4] = True
    lab = an.label_components(mask)
    assert (lab[~mask] == -1).all()
    assert len(np.unique(lab[0][mask[0]])) == 2 and len(np.unique(lab[1][mask[1]])) == 1
    assert lab[0, 3, 3] == lab[0, 1, 1] == 9  # the smallest pixel index of the component
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    masks = rng.random((20, 16, 16)) < 0.45
    lab = an.label_components(masks)
    for m, l in zip(masks, lab):
        assert len(np.unique(l[m])) == ndimage.label(m, np.ones((3, 3)))[1]


# ----------------------------------------------------------------------------- crafted negatives


def _draw(colors, shapes, cx, cy, size=8.0, res=32):
    """Clips of one shape each, placed by hand: ``cx``, ``cy`` ``(N, T)`` px."""
    n = len(colors)
    params = dict(color=np.array(colors), shape=np.array(shapes), size=np.full(n, size, np.float32),
                  cx=np.asarray(cx, np.float32), cy=np.asarray(cy, np.float32))
    return ms.render(params, (res, res))


def test_black_clip_is_none():
    r = an.analyze_video(np.zeros((17, 32, 32, 3), np.uint8))
    assert r["status"] == "none" and r["color"] is r["shape"] is r["direction"] is None


def test_two_shapes_are_several():
    t = np.linspace(0, 1, 17)
    down, up = 6 + 20 * t, 26 - 20 * t
    two = _draw([0, 2], [1, 0], [np.full(17, 8.0), np.full(17, 24.0)], [down, up]).max(0)  # square | circle
    r = an.analyze_video(two)
    assert r["status"] == "several" and r["num_components"] == 2 and r["color"] is None


def test_static_object_has_direction_static():
    clip = _draw([4], [2], [np.full(17, 15.0)], [np.full(17, 14.0)])[0]
    r = an.analyze_video(clip)
    assert r["status"] == "ok" and (r["color"], r["shape"], r["direction"]) == ("magenta", "triangle", "static")
    assert r["confidence"]["direction"] == 0.0


def test_noise_and_grey_are_not_confident():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (3, 17, 32, 32, 3), dtype=np.uint8)
    grey = np.repeat(ms.render_clips("validation", [0])[0].max(-1, keepdims=True), 3, -1)  # no hue
    a = an.analyze_videos(np.concatenate([noise, grey]))
    assert (a.status != "ok").all() and (a.color == -1).all() and (a.confidence == 0).all()
    assert set(a.status) <= {"unclear", "several"}


def test_object_in_few_frames_is_none():
    v, _ = ms.render_clips("validation", [0])
    v[:, 3:] = 0  # the object vanishes after 3 of 17 frames
    assert an.analyze_video(v[0])["status"] == "none"


# ----------------------------------------------------------------------------- adherence, consistency


def test_parse_prompt():
    assert ev.parse_prompt("a red circle moving left") == ("red", "circle", "left")
    assert ev.parse_prompt(b"A Cyan triangle moving up.") == ("cyan", "triangle", "up")
    assert ev.parse_prompt(("blue", "square", "down")) == ("blue", "square", "down")
    for bad in ("a red circle", "a purple circle moving left", ("red", "blob", "up")):
        with pytest.raises(ValueError):
            ev.parse_prompt(bad)


def test_adherence_real_clips_and_swapped_colors():
    val, pv = ms.render_clips("validation", np.arange(64))
    held, ph = ms.render_clips("heldout", np.arange(16))
    videos = np.concatenate([val, held])
    prompts = [ms.caption(ms.COLORS[c], ms.SHAPES[s], ms.DIRECTIONS[d])
               for p in (pv, ph) for c, s, d in zip(p["color"], p["shape"], p["direction"])]
    res = ev.caption_adherence(videos, prompts)
    assert res["num_videos"] == 80
    assert res["train"]["count"] == 64 and res["heldout"]["count"] == 16 and res["overall"]["count"] == 80
    for g in ("train", "heldout", "overall"):
        assert all(res[g][k] == 1.0 for k in ("color", "shape", "direction", "all_correct"))
        assert res[g]["status"]["ok"] == res[g]["count"]
    swapped = ev.caption_adherence(videos[..., ROTATE], prompts)
    assert swapped["overall"]["color"] == 0.0 and swapped["overall"]["all_correct"] == 0.0
    assert swapped["overall"]["shape"] == swapped["overall"]["direction"] == 1.0
    # Triples work as prompts; an Analysis can stand in for the videos.
    triples = [ev.parse_prompt(p) for p in prompts]
    assert ev.caption_adherence(an.analyze_videos(videos), triples) == res
    with pytest.raises(ValueError, match="prompts"):
        ev.caption_adherence(videos, prompts[:-1])


def test_adherence_counts_unreadable_videos_wrong():
    v, p = ms.render_clips("heldout", np.arange(4))
    v[1] = 0  # nothing there
    prompts = [ms.caption(ms.COLORS[c], ms.SHAPES[s], ms.DIRECTIONS[d])
               for c, s, d in zip(p["color"], p["shape"], p["direction"])]
    res = ev.caption_adherence(v, prompts)
    assert res["train"]["count"] == 0 and res["train"]["color"] is None
    h = res["heldout"]
    assert h["count"] == 4 and h["color"] == h["all_correct"] == 0.75 and h["status"]["none"] == 1


def test_temporal_consistency():
    v, _ = ms.render_clips("validation", np.arange(8))
    assert ev.temporal_consistency(v) == 1.0
    broken = v.copy()
    broken[0, 12:] = 0  # object gone in 5 of 17 frames
    broken[1, 13:] = broken[1, 13:][..., ROTATE]  # colour changes in 4 frames
    scores = ev.temporal_consistency(broken, per_video=True)
    np.testing.assert_allclose(scores, [12 / 17, 13 / 17] + [1.0] * 6)
    assert ev.temporal_consistency(np.zeros((2, 17, 32, 32, 3), np.uint8)) == 0.0


# ----------------------------------------------------------------------------- PSNR

TRACES = []


class ToyVAE(nn.Module):
    """encode = identity posterior, decode = ``scale * z``: a VAE with a known error."""

    scale: float = 1.0

    def encode(self, x, chunked=False):
        return DiagonalGaussian(x, jnp.zeros_like(x))

    def decode(self, z, chunked=False):
        TRACES.append(z.shape)  # runs once per trace
        return jnp.clip(self.scale * z, -1, 1)


def test_psnr_known_values():
    x = np.zeros((2, 5, 8, 8, 3), np.float32)
    assert (ev.psnr(x, x) == 100.0).all()
    np.testing.assert_allclose(ev.psnr(x + 0.1, x), 10 * np.log10(4 / 0.01))  # 26.02 dB
    u8 = np.full((1, 2, 2, 2, 3), 255, np.uint8)
    np.testing.assert_allclose(ev.psnr(u8 / 127.5 - 1, (u8 - 51) / 127.5 - 1), 20 * np.log10(255 / 51))


def test_reconstruction_psnr_identity_and_scaled():
    v, _ = ms.render_clips("validation", np.arange(5), frames=5, resolution=16)
    TRACES.clear()
    assert ev.reconstruction_psnr(ToyVAE(), {}, v, batch_size=2) == 100.0
    assert TRACES == [(2, 5, 16, 16, 3)]  # one trace for 3 batches, the last one padded
    x = v / 127.5 - 1
    expect = ev.psnr(np.clip(0.9 * x, -1, 1), x).mean()
    np.testing.assert_allclose(ev.reconstruction_psnr(ToyVAE(0.9), {}, v, batch_size=4), expect, rtol=1e-5)


def test_reconstruction_psnr_causal_vae():
    vae = CausalVAE(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temporal_downsample=(True, True),
                    mid_attention=False)
    # Random parameters of the right structure without compiling init (slow on CPU).
    shapes = nn.meta.unbox(jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 1, 4, 4, 3)))["params"])
    rng = np.random.default_rng(0)
    params = traverse_util.unflatten_dict({
        k: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])) if k[-1] == "kernel"
                       else (np.ones(s.shape) if k[-1] == "scale" else np.zeros(s.shape)), s.dtype)
        for k, s in traverse_util.flatten_dict(shapes).items()
    })
    v, _ = ms.render_clips("validation", np.arange(3), frames=5, resolution=16)
    db = ev.reconstruction_psnr(vae, params, v, batch_size=2)
    assert np.isfinite(db) and 0 < db < 100


def test_shape_measures_tell_drawn_alike_from_misread():
    v, p = ms.render_clips("validation", np.arange(60))
    m = ev.shape_measures(v, p["shape"])
    assert set(m) == set(ms.SHAPES) and sum(g["count"] for g in m.values()) == 60
    assert abs(m["circle"]["corner"]) < 0.1 and abs(m["square"]["corner"] - an.SQUARE_CORNER) < 0.1
    assert m["triangle"]["skew"] < an.AnalyzerConfig().skew_bound
    # Circles and squares asked for each other: the measures follow what was drawn.
    swap = {"circle": "square", "square": "circle", "triangle": "triangle"}
    swapped = ev.shape_measures(v, [swap[ms.SHAPES[s]] for s in p["shape"]])
    assert swapped["square"]["corner"] == m["circle"]["corner"] and swapped["circle"]["corner"] == m["square"]["corner"]
    with pytest.raises(ValueError, match="got 60 videos but 59 shapes"):
        ev.shape_measures(v, p["shape"][:59])


def test_vae_roundtrip_returns_reconstructions():
    v, _ = ms.render_clips("validation", np.arange(3), frames=5, resolution=16)
    rec, mse = ev.vae_roundtrip(ToyVAE(), {}, v, batch_size=2)
    assert rec.dtype == np.uint8 and (rec == v).all() and (mse < 1e-12).all()
    rec, mse = ev.vae_roundtrip(ToyVAE(0.5), {}, v, batch_size=2)
    np.testing.assert_array_equal(rec, np.round((0.5 * (v / 127.5 - 1) + 1) * 127.5).astype(np.uint8))
    assert mse.shape == (3,) and (mse > 0).all()


def test_attribute_agreement():
    v, p = ms.render_clips("validation", np.arange(24))
    same = ev.attribute_agreement(v, v)
    assert same == {"color": 1.0, "shape": 1.0, "direction": 1.0, "all_correct": 1.0, "count": 24}
    # Recoloured: every colour changes, shape and motion stay.
    recolored = ev.attribute_agreement(v[..., ROTATE], v)
    assert recolored["color"] == 0 and recolored["shape"] == 1 and recolored["direction"] == 1
    assert recolored["all_correct"] == 0
    # Played backwards: every direction flips; one clip blacked out disagrees on everything.
    backwards = v[:, ::-1].copy()
    backwards[0] = 0
    res = ev.attribute_agreement(backwards, v)
    assert res["direction"] == 0 and res["color"] == res["shape"] == 23 / 24
    # Squares blurred round: the analyzer's corner measure is what a VAE can lose.
    blurred = _blur(v.astype(np.float32), 2.0).astype(np.uint8)
    res = ev.attribute_agreement(blurred, v)
    squares = p["shape"] == ms.SHAPES.index("square")
    assert squares.any() and res["shape"] <= 1 - squares.mean() / 2
    with pytest.raises(ValueError, match="as many videos as references, got 23 and 24"):
        ev.attribute_agreement(v[:23], v)


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_closed_form():
    mu1, mu2 = np.zeros(2), np.array([1.0, 2.0])
    c1, c2 = np.diag([1.0, 4.0]), np.diag([4.0, 9.0])
    # |mu1 - mu2|^2 + sum (sigma1 - sigma2)^2 for commuting covariances.
    assert fr.gaussian_frechet_distance(mu1, c1, mu2, c2) == pytest.approx(5 + 1 + 1)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 6, 6))
    c1, c2 = a @ a.T, b @ b.T + 0.1 * np.eye(6)  # non-commuting
    # tr((c1^1/2 c2 c1^1/2)^1/2) = sum of sqrt(eigenvalues of c1 c2).
    expect = np.trace(c1) + np.trace(c2) - 2 * np.sqrt(np.linalg.eigvals(c1 @ c2).real.clip(0)).sum()
    got = fr.gaussian_frechet_distance(np.zeros(6), c1, np.zeros(6), c2)
    assert got == pytest.approx(expect, rel=1e-6)
    assert got == pytest.approx(fr.gaussian_frechet_distance(np.zeros(6), c2, np.zeros(6), c1), rel=1e-6)
    # Fitted to samples, the distance approaches the closed form.
    x = rng.multivariate_normal(np.zeros(6), c1, 20000)
    y = rng.multivariate_normal(np.ones(6), c2, 20000)
    assert fr.frechet_distance(x, y) == pytest.approx(expect + 6, rel=0.05)


def test_frechet_on_clips():
    a, pa = ms.render_clips("validation", np.arange(300))
    b, pb = ms.render_clips("validation", np.arange(300, 600))
    fa, fb = fr.clip_features(a), fr.clip_features(b)
    assert fa.shape == (300, 66) and np.isfinite(fa).all()
    assert fr.frechet_distance(fa, fa) == pytest.approx(0, abs=1e-8)
    base = fr.frechet_distance(fa, fb)
    assert base == pytest.approx(fr.frechet_distance(fb, fa), rel=1e-6)
    # Colours swapped: red clips against red clips recoloured blue.
    ra, rb = fr.clip_features(a[pa["color"] == 0]), b[pb["color"] == 0]
    same = fr.frechet_distance(ra, fr.clip_features(rb))
    assert fr.frechet_distance(ra, fr.clip_features(rb[..., ROTATE])) > 10 * same
    # Blur, degradation, static objects and noise are farther still from real clips.
    blurred = fr.frechet_distance(fa, fr.clip_features(_blur(b.astype(np.float32), 1.0).astype(np.uint8)))
    static = fr.frechet_distance(fa, fr.clip_features(np.repeat(b[:, :1], b.shape[1], 1)))
    noise = fr.frechet_distance(fa, fr.clip_features(np.random.default_rng(0).integers(0, 256, b.shape, np.uint8)))
    assert base < blurred < noise and 2 * base < static < noise


# ----------------------------------------------------------------------------- eval.json


def test_evaluate_samples_schema(tmp_path):
    gen, p = ms.render_clips("heldout", np.arange(16), frames=5, resolution=16)
    prompts = [ms.caption(ms.COLORS[c], ms.SHAPES[s], ms.DIRECTIONS[d])
               for c, s, d in zip(p["color"], p["shape"], p["direction"])]
    gen[0] = 0
    real, _ = ms.render_clips("validation", np.arange(32), frames=5, resolution=16)
    res = ev.evaluate_samples(gen, prompts, real_videos=real, vae=ToyVAE(), vae_params={}, extra={"step": 7})
    assert set(res) == {"schema_version", "num_videos", "train", "heldout", "overall", "confusion",
                        "temporal_consistency", "frechet_distance", "num_real_videos", "vae_psnr_db", "vae_agreement",
                        "shape_measures", "step"}
    assert set(res["shape_measures"]) == {"generated", "real", "vae"}
    assert res["shape_measures"]["vae"] == res["shape_measures"]["real"]  # the identity VAE
    assert res["num_videos"] == 16 and res["num_real_videos"] == 32 and res["vae_psnr_db"] == 100.0
    assert res["vae_agreement"] == {"color": 1.0, "shape": 1.0, "direction": 1.0, "all_correct": 1.0, "count": 32}
    assert res["heldout"]["all_correct"] == 15 / 16 and res["train"]["all_correct"] is None
    assert res["temporal_consistency"] == 15 / 16 and res["frechet_distance"] > 0
    assert set(res["overall"]) == {"count", "color", "shape", "direction", "all_correct", "status"}
    # Confusion: video 0 is black (unread); the others read as asked.
    conf = res["confusion"]
    assert set(conf) == {"color", "shape", "direction"}
    assert sum(n for row in conf["shape"].values() for n in row.values()) == 16
    asked0 = ms.SHAPES[p["shape"][0]]
    assert conf["shape"][asked0]["unread"] == 1
    for attr, names in (("color", ms.COLORS), ("shape", ms.SHAPES), ("direction", ms.DIRECTIONS)):
        for asked, row in conf[attr].items():
            assert set(row) >= set(names) | {"unread"}
            wrong = sum(n for read, n in row.items() if read not in (asked, "unread"))
            assert wrong == 0, (attr, asked, row)
    assert set(conf["direction"][next(iter(conf["direction"]))]) == set(ms.DIRECTIONS) | {"static", "unread"}
    ev.save_results(res, tmp_path / "W" / "eval.json")
    assert json.loads((tmp_path / "W" / "eval.json").read_text()) == res
    table = ev.format_table(res)
    assert "heldout" in table and "0.938" in table and "100.00 dB" in table
    assert "VAE reconstructions keep color/shape/direction in 100%/100%/100% of 32 validation clips" in table
    assert "median corner (square above 0.3): generated " in table and " | real circle " in table
    color0 = ms.COLORS[p["color"][0]]
    assert f"most misread: {color0}->unread 1, {asked0}->unread 1, " in table
    bare = ev.evaluate_samples(gen, prompts)
    assert bare["frechet_distance"] is None and bare["vae_psnr_db"] is None and bare["vae_agreement"] is None
    assert "-" in ev.format_table(bare)
    with pytest.raises(ValueError, match="overwrite"):
        ev.summarize(ev.caption_adherence(gen, prompts), extra={"train": 1})
