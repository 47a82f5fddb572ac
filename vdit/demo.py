"""`vdit demo`: from nothing to caption-following videos of moving shapes on a CPU.

Steps, each skipped when its result is already in the workdir (so a second run resumes
or reuses instead of starting over):

1. prepare the ``moving_shapes`` dataset;
2. train the VAE, then the text encoder and DiT on cached VAE latents;
3. sample a fixed prompt set covering every color, shape and direction and every
   heldout combination, several seeds each;
4. write ``W/samples/*.mp4``, a labelled GIF grid, a PNG contact sheet and
   ``W/eval.json``, and print a results table.
"""

from __future__ import annotations

import pathlib
import time

import ml_collections
import numpy as np

from vdit import media
from vdit.data import moving_shapes as ms


def demo_prompts() -> list[tuple[str, tuple[str, str, str], str]]:
    """The fixed prompt set: ``(prompt, (color, shape, direction), "train" | "heldout")``.

    Twelve train-distribution combinations (every color twice, every shape four
    times, every direction three times) and all heldout combinations.
    """
    out, heldout = [], set(ms.HELDOUT_COMBOS)
    for i in range(12):
        color, shape = ms.COLORS[i % 6], ms.SHAPES[i % 3]
        for k in range(4):  # the first direction that keeps the combination in train
            combo = (color, shape, ms.DIRECTIONS[(i + k) % 4])
            if combo not in heldout:
                break
        out.append((ms.caption(*combo), combo, "train"))
    out += [(ms.caption(*combo), combo, "heldout") for combo in ms.HELDOUT_COMBOS]
    return out


def sample_names(seeds: int) -> list[str]:
    """File stems of the demo's samples in ``W/samples``: ``{prompt index:02d}_{slug}_s{seed}``."""
    return [f"{i:02d}_{media.slug(p)}_s{s}" for i, (p, _, _) in enumerate(demo_prompts()) for s in range(seeds)]


LABELLED_GRID = "grid_labelled.gif"  # only the demo writes it: marks W/samples as the demo's


def check_samples_writable(samples: pathlib.Path, names: list[str]) -> None:
    """Refuses a samples folder holding files of the demo's names that an earlier demo did not write.

    A demo rerun replaces its own samples (it samples again with this run's settings), but
    never ``vdit sample``'s grid or contact sheet in the same folder.
    """
    if (samples / LABELLED_GRID).exists():
        media.check_can_write(samples, [])  # still must be a folder
        return
    media.check_can_write(samples, media.output_names(names),
                          hint="they are not from `vdit demo`; move them away or use another --workdir")


def labelled_grid(videos: np.ndarray, labels: list[str], columns: int, scale: int = 3) -> np.ndarray:
    """A GIF-ready grid ``(T, H', W', 3)`` with each video upscaled and its label written above it."""
    from PIL import Image, ImageDraw

    videos = media.to_uint8(videos)
    n, t, h, w, _ = videos.shape
    big = videos.repeat(scale, axis=2).repeat(scale, axis=3)
    band = 12
    cells = np.zeros((n, t, h * scale + band, w * scale, 3), np.uint8)
    cells[:, :, band:] = big
    for i, label in enumerate(labels):
        strip = Image.new("RGB", (w * scale, band))
        ImageDraw.Draw(strip).text((1, 0), label, fill=(230, 230, 230))
        cells[i, :, :band] = np.asarray(strip)
    return media.grid(cells, columns)


def quick_overrides() -> list[str]:
    """``--quick``: the same pipeline at minutes scale (CI runs it end to end)."""
    return ["data.frames=5", "data.resolution=16", "data.batch_size=16", "vae_train.steps=30",
            "vae_train.short_steps=0", "vae_train.checkpoint_every=30", "train.steps=30", "train.checkpoint_every=30",
            "train.eval_every=0", "sample.steps=4"]


def _other_run(workdir: pathlib.Path, phase: str, quick: bool) -> str:
    """What a demo workdir whose checkpoints do not fit this run holds, and what to do."""
    import json

    quick_data = dict(o.split("=", 1) for o in quick_overrides() if o.startswith("data."))
    try:
        data = json.loads((workdir / phase / "config.json").read_text())["data"]
        was_quick = all(str(data[key.split(".")[1]]) == value for key, value in quick_data.items())
    except (OSError, ValueError, KeyError, TypeError):
        return "the workdir holds another run: pass another --workdir"
    if was_quick != quick:
        flag = "with --quick" if was_quick else "without --quick"
        return f"{workdir} holds a `vdit demo` run {flag}: rerun it so, or pass another --workdir"
    return "the workdir holds a demo run with other overrides: rerun with those, or pass another --workdir"


def run_demo(workdir: str | pathlib.Path, *, quick: bool = False, data_dir: str | None = None,
             seeds: int | None = None, config: ml_collections.ConfigDict | None = None,
             overrides: list[str] | tuple[str, ...] = (), progress: bool = True) -> dict:
    """Runs the whole demo in ``workdir``; returns the evaluation results (also in ``W/eval.json``).

    ``overrides`` (``"train.steps=1000"``, ...) apply on top of ``shapes_cpu`` (and ``quick``)
    or of a copy of ``config``, which is left unchanged.
    """
    import jax

    from vdit import evaluate
    from vdit.checkpoint import CheckpointMismatch
    from vdit.config import load_config, override
    from vdit.data.moving_shapes import prepare_moving_shapes
    from vdit.data.pipeline import open_dataset
    from vdit.loop import train
    from vdit.sample import generate, load_pipeline

    started = time.perf_counter()
    workdir = pathlib.Path(workdir).absolute()
    if config is None:
        config = load_config("shapes_cpu")
        if quick:
            override(config, quick_overrides())
    else:
        config = config.copy_and_resolve_references()  # the demo sets data and cache keys; the caller's stays as given
    override(config, list(overrides))
    seeds = seeds or (2 if quick else 4)
    check_samples_writable(workdir / "samples", sample_names(seeds))  # before hours of training, not after
    # Enough distinct clips for the DiT's epochs, few enough to encode into the latent cache in minutes.
    counts = dict(num_train=256, num_validation=64, num_heldout=64) if quick else dict(
        num_train=4000, num_validation=500, num_heldout=500)
    data_dir = data_dir or config.data.data_dir or str(workdir / "data")
    with config.unlocked():
        config.data.data_dir = data_dir
        config.data.name = prepare_moving_shapes(data_dir, frames=config.data.frames, resolution=config.data.resolution,
                                                 progress=progress, **counts)
        config.train.latents = "cached"
    timings = {"prepare_s": time.perf_counter() - started}

    for phase in ("vae", "dit"):
        t0 = time.perf_counter()
        try:
            train(config, workdir, phase, progress=progress)
        except CheckpointMismatch as e:
            raise CheckpointMismatch(f"{e} ({_other_run(workdir, phase, quick)})") from None
        timings[f"train_{phase}_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pipe = load_pipeline(workdir)
    prompts = demo_prompts()
    texts = [p for p, _, _ in prompts]
    # The workdir's config holds the sample settings of the run that trained it; this run's
    # overrides (``sample.cfg=6`` on a finished workdir) are what the user asked for now.
    opts = config.sample
    videos = generate(pipe, texts, num_per_prompt=seeds, steps=opts.steps, sampler=opts.sampler, cfg=opts.cfg,
                      seed=opts.seed, negative_prompt=opts.negative_prompt, eta=opts.get("eta"))
    samples = workdir / "samples"
    labels = [f"{'H ' if split == 'heldout' else ''}{c} {s} {d}"
              for _, (c, s, d), split in prompts for _ in range(seeds)]
    # The labelled grid first: it marks the folder as the demo's before anything else is replaced.
    samples.mkdir(parents=True, exist_ok=True)
    media.write_video(samples / LABELLED_GRID, labelled_grid(videos, labels, columns=seeds * 4))
    paths = media.write_all(samples, videos, sample_names(seeds), overwrite=True)  # checked above
    timings["sample_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    validation = open_dataset(config.data.name, data_dir, "validation")
    real = np.stack([validation.source[i]["video"] for i in range(min(len(validation), 256))])
    expected = [(combo, split) for _, combo, split in prompts for _ in range(seeds)]  # split follows HELDOUT_COMBOS
    results = evaluate.evaluate_samples(videos, [combo for combo, _ in expected], real_videos=real,
                                        vae=pipe.models.vae, vae_params=pipe.params["vae"], vae_videos=real[:64])
    timings["eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    results.update(timings=timings, quick=quick, seeds=seeds, devices=f"{jax.device_count()} {jax.default_backend()}",
                   samples=paths["grid"])
    if jax.process_index() == 0:
        evaluate.save_results(results, workdir / "eval.json")
    print(evaluate.format_table(results))
    return results


def _rerun_hint(workdir: pathlib.Path) -> str:
    trained = (workdir / "dit" / "config.json").exists() or (workdir / "vae" / "config.json").exists()
    demo_traces = (workdir / "data").is_dir() or (workdir / "samples" / LABELLED_GRID).exists()
    if trained and not demo_traces:
        # `vdit demo` there would train on with the demo's config instead of the user's.
        return (f"`vdit eval` judges the samples of `vdit demo`, and {workdir} looks like a `vdit train` workdir: "
                f"sample it with `vdit sample --workdir {workdir} --prompt ...` (or, if it is an unfinished demo, "
                f"rerun `vdit demo --workdir {workdir}`)")
    return f"run `vdit demo --workdir {workdir}` (it reuses the data and checkpoints already there)"


def evaluate_workdir(workdir: str | pathlib.Path) -> dict:
    """Re-runs the evaluation of a demo workdir's samples (``vdit eval``) and rewrites ``eval.json``."""
    import json

    from vdit import evaluate

    workdir = pathlib.Path(workdir)
    path = workdir / "eval.json"
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"workdir {workdir} is a file, expected the folder of a `vdit demo` run")
    if not workdir.exists():
        raise FileNotFoundError(f"workdir {workdir} not found; run `vdit demo --workdir {workdir}` first")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {_rerun_hint(workdir)}")
    try:
        previous = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {_rerun_hint(workdir)}") from None
    seeds = previous.get("seeds") if isinstance(previous, dict) else None
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        got = "has no 'seeds'" if seeds is None else f"has seeds={seeds!r}, expected a positive integer"
        raise ValueError(f"{path} {got} (the demo writes it); {_rerun_hint(workdir)}")
    prompts = demo_prompts()
    files = [workdir / "samples" / f"{n}.mp4" for n in sample_names(seeds)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{workdir / 'samples'} lacks {len(missing)} of the {len(files)} demo samples "
                                f"eval.json counts ({shown}); {_rerun_hint(workdir)}")
    videos = [media.read_video(f) for f in files]
    if len({v.shape for v in videos}) > 1:
        raise ValueError(f"the demo samples in {workdir / 'samples'} differ in shape; {_rerun_hint(workdir)}")
    combos = [combo for _, combo, _ in prompts for _ in range(seeds)]
    fresh = evaluate.evaluate_samples(np.stack(videos), combos)
    previous.update({k: v for k, v in fresh.items() if v is not None})
    evaluate.save_results(previous, path)
    print(evaluate.format_table(previous))
    return previous
