"""The Colab notebooks: stored without outputs, and run end to end on a CPU with small parameters.

CI cannot run a notebook at Colab scale, so each run injects a cell of small values
right after the notebook's ``parameters`` cell (as papermill does) and executes the
notebook in a fresh kernel with nbclient. Only names the parameters cell defines may be
injected, so a renamed parameter fails here instead of being silently ignored.
"""

import ast
import os
import pathlib
import tomllib

import nbformat
import pytest

REPO = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
# Small models for CI: the VAE's compile time dominates a notebook run on a CPU.
SMALL = ["vae.dim_mult=(1,2)", "vae.temporal_downsample=(True,)", "vae.num_res_blocks=0", "dit.depth=1",
         "vae_train.steps=4", "vae_train.checkpoint_every=4", "train.steps=6", "sample.steps=2"]
REPO_URL = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def _parameters_cell(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def _assigned_names(source: str) -> dict:
    """Top-level ``NAME = literal`` assignments of a cell."""
    out = {}
    for node in ast.parse(source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.unparse(node)
        out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def execute(name: str, params: dict, cwd: pathlib.Path, *, devices: int) -> nbformat.NotebookNode:
    """Runs ``colab/<name>`` with ``params`` injected after its parameters cell; returns the executed notebook."""
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "colab" / name, as_version=4)
    index = _parameters_cell(nb)
    unknown = set(params) - set(_assigned_names(nb.cells[index].source))
    assert not unknown, f"{name} has no parameters {sorted(unknown)}"
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, injected)
    # The kernel is a new process: give it the CPU devices explicitly rather than inheriting conftest's.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), TQDM_DISABLE="1")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute(env=env)
    return nb


def outputs(nb, kind: str = "text") -> str:
    """All of an executed notebook's stream text (``kind="text"``) or rich-output MIME types joined."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind == "text" and out.output_type == "stream":
                parts.append(out.text)
            elif kind != "text" and out.output_type in ("display_data", "execute_result"):
                parts.extend(f"{mime}\n{data}" for mime, data in out.data.items() if mime.startswith(kind))
    return "\n".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_notebook_is_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {i} has stored outputs"
    params = _assigned_names(nb.cells[_parameters_cell(nb)].source)
    assert params["REPO_URL"] == REPO_URL and params["INSTALL"] is True  # Colab users install from the repository
    badge = f"https://colab.research.google.com/github/{REPO_URL.removeprefix('https://github.com/')}/blob/main/colab/"
    assert badge + path.name in nb.cells[0].source, "first cell needs its own Open in Colab badge"
    assert nb.metadata.kernelspec.name == "python3"


def test_notebooks_exist_and_readme_links_them():
    assert [p.name for p in NOTEBOOKS] == ["quickstart.ipynb", "train_tpu.ipynb"]
    readme = (REPO / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"colab.research.google.com/github/{REPO_URL.removeprefix('https://github.com/')}/blob/main/colab/" \
               f"{path.name}" in readme, f"README has no Open in Colab badge for {path.name}"


def test_quickstart_trains_samples_and_shows_videos(tmp_path):
    workdir = tmp_path / "demo"
    prompts = ["a red circle moving left", "a cyan square moving down"]
    nb = execute("quickstart.ipynb", dict(
        INSTALL=False, WORKDIR=str(workdir), CONFIG="tiny", QUICK=True, SEEDS=1, PROMPTS=prompts, NUM_PER_PROMPT=2,
        OVERRIDES=SMALL + ["train.checkpoint_every=6"],
    ), tmp_path, devices=1)
    text = outputs(nb)
    assert "skipped (INSTALL = False): " in text and f"'vdit @ git+{REPO_URL}'" in text
    assert "quick (vdit demo --quick)" in text and "heldout" in text  # run_demo's results table
    assert (workdir / "eval.json").exists() and (workdir / "dit" / "checkpoints").is_dir()
    assert "4 videos of shape (5, 16, 16, 3)" in text
    assert text.count("analyzer reads:") == 4
    assert "image/gif" in outputs(nb, "image")  # the labelled grid of the demo's samples
    html = outputs(nb, "text/html")
    assert html.count("<video") == 4 and all(f"{p} #1" in html for p in prompts)  # mediapy.show_videos


def test_train_tpu_trains_on_a_mesh_resumes_and_samples(tmp_path):
    from vdit.metrics import read_metrics

    workdir = tmp_path / "run"
    nb = execute("train_tpu.ipynb", dict(
        INSTALL=False, CONFIG="tiny", WORKDIR=str(workdir), DATA_DIR=str(tmp_path / "data"), NUM_CLIPS=64,
        INTERRUPT_AFTER=3, NUM_PER_PROMPT=1,
        OVERRIDES=SMALL + ["train.checkpoint_every=100", "train.log_every=1", "train.eval_every=0"],
    ), tmp_path, devices=8)
    text = outputs(nb)
    assert "8 cpu devices" in text and "'fsdp': 8" in text  # MESH's fsdp=-1 took every device
    assert "'step': 3, 'status': 'stopped'" in text and "'step': 6, 'status': 'done'" in text
    # The resumed call continued from step 3: every step logged once, none trained twice.
    assert [r["step"] for r in read_metrics(workdir / "dit") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (workdir / "jax_cache").is_dir()
    assert "2 videos of shape (5, 16, 16, 3)" in text and outputs(nb, "text/html").count("<video") == 2
