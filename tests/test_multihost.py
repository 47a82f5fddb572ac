"""Two real processes (jax.distributed over gloo, 4 CPU devices each) train, checkpoint and resume,
and sample together.

The parameters must be identical on both processes and equal to a one-process run on 8
devices: global batches do not depend on the process count (see vdit.data.pipeline).
"""

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import portpicker
import pytest

from vdit.loop import train
from tests.test_loop import _final_params, data, tiny, vae_workdir  # noqa: F401  (fixtures)

REPO = pathlib.Path(__file__).parent.parent

WORKER = textwrap.dedent("""
    import sys, numpy as np, jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, workdir, root, name = sys.argv[1:6]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(pid))
    from jax.experimental import multihost_utils
    from vdit.config import load_config, override
    from vdit.loop import train
    config = override(load_config("tiny"), [f"data.name={name}", f"data.data_dir={root}", "train.log_every=1",
                      "train.steps=6", "train.checkpoint_every=100", "train.eval_every=0"])
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    first = train(config, workdir, "dit", stop_after=3, progress=False)   # interrupted ...
    final = train(config, workdir, "dit", progress=False)                 # ... and resumed
    from vdit.loop import load_params
    from vdit.models import build_models
    from vdit.sharding import make_mesh, rules_from_config
    mesh = make_mesh({"data": -1})
    params = load_params(workdir, "dit", config, build_models(config), mesh,
                         rules_from_config(config.sharding_rules), ema=False)
    flat = multihost_utils.process_allgather(params, tiled=True)
    np.savez(f"{workdir}/params_{pid}.npz", *[np.asarray(x) for x in jax.tree.leaves(flat)])
    print("DONE", first["step"], final["step"])
""")


@pytest.mark.slow
def test_two_processes_train_and_sample_like_one_process(data, vae_workdir, tmp_path):  # noqa: F811
    root, name = data
    reference = tmp_path / "single"
    shutil.copytree(vae_workdir / "vae", reference / "vae")
    config = tiny(data, "train.steps=6", "train.checkpoint_every=100", "train.eval_every=0")
    train(config, reference, "dit", progress=False)
    paths, want = zip(*[(jax.tree_util.keystr(k), v)
                        for k, v in jax.tree_util.tree_flatten_with_path(_final_params(reference))[0]])

    multi = tmp_path / "multi"
    shutil.copytree(vae_workdir / "vae", multi / "vae")
    port = portpicker.pick_unused_port()
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), str(multi), root, name], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "DONE 3 6" in out, out[-3000:]

    got = [np.load(multi / f"params_{i}.npz") for i in range(2)]
    leaves = [[g[f"arr_{j}"] for j in range(len(g.files))] for g in got]
    assert len(leaves[0]) == len(want)
    for path, a, b, c in zip(paths, leaves[0], leaves[1], want):
        np.testing.assert_array_equal(a, b, err_msg=path)   # identical across processes
        if path.startswith("['text']") and path.endswith("['attn']['k']['linear']['bias']"):
            # The text encoder's attention has no q/k norm, and softmax ignores a shift shared by
            # a query's scores: its key bias's gradient is zero, so Adam moves it only by
            # rounding noise, which depends on the reduction order.
            assert np.abs(a).max() < 1e-5 and np.abs(c).max() < 1e-5, path
            continue
        np.testing.assert_allclose(a, c, atol=1e-6, err_msg=path)  # and equal to one process on 8 devices

    # Sampling from the trained run, here rather than in a test of its own: the fixtures and
    # the training cost more than the sampling.
    _two_processes_sample_the_one_process_videos(reference, tmp_path)


def _two_processes_sample_the_one_process_videos(workdir, tmp_path):
    # `vdit sample --distributed` on two processes: the run's mesh over both (8 devices), one
    # writer, and the videos of one process sampling on 8 devices.
    import mediapy

    from vdit.sample import config_from_workdir, generate, load_pipeline, sample_mesh, save_samples

    prompts = ["a red circle moving left", "a blue square moving up"]
    mesh = sample_mesh(config_from_workdir(workdir), "config")
    assert mesh.size == 8
    want = tmp_path / "one"
    save_samples(generate(load_pipeline(workdir, mesh=mesh), prompts, num_per_prompt=2, steps=3), prompts, want,
                 num_per_prompt=2)

    out = tmp_path / "two"
    port = portpicker.pick_unused_port()
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), VDIT_HUGEPAGES="0")
    argv = [sys.executable, "-m", "vdit", "sample", "--workdir", str(workdir), "--num", "2", "--steps", "3",
            "--out", str(out), "--distributed", "--coordinator", f"localhost:{port}", "--num_processes", "2",
            *[a for p in prompts for a in ("--prompt", p)]]
    # Files, not pipes: a process blocked on a full pipe would stall the other in a collective.
    logs = [(tmp_path / f"out{i}.txt", tmp_path / f"err{i}.txt") for i in range(2)]
    with contextlib.ExitStack() as files:
        procs = [subprocess.Popen([*argv, "--process_id", str(i)], env=env,
                                  stdout=files.enter_context(open(o, "w")), stderr=files.enter_context(open(e, "w")))
                 for i, (o, e) in enumerate(logs)]
        try:
            for p in procs:
                p.wait(timeout=600)
        finally:  # a hung process must not outlive the test
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    outs = [(o.read_text(), e.read_text()) for o, e in logs]
    for p, (_, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
    # Process 0 writes, alone. (Gloo's threads also print, a line in several writes that can interleave.)
    wrote = f"wrote 4 videos (mp4 + gif), {out}/grid.gif and {out}/contact_sheet.png"
    assert outs[0][0].count(wrote) == 1 and "wrote" not in outs[1][0], outs
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in want.iterdir())
    # Every frame of every video, losslessly: equal up to the rounding of a reduction order.
    sheets = [mediapy.read_image(d / "contact_sheet.png").astype(int) for d in (out, want)]
    assert sheets[0].shape == sheets[1].shape and np.abs(sheets[0] - sheets[1]).max() <= 1
