"""Two real processes (jax.distributed over gloo, 4 CPU devices each) train, checkpoint and resume.

The parameters must be identical on both processes and equal to a one-process run on 8
devices: global batches do not depend on the process count (see vdit.data.pipeline).
"""

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
def test_two_processes_equal_one_process(data, vae_workdir, tmp_path):  # noqa: F811
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
