"""Config loading, overrides with suggestions, and every shipped config builds."""

import subprocess
import sys

import pytest

from vdit.config import available_configs, load_config, override
from vdit.models import build_models, param_counts

SHIPPED = ["bench_cpu", "shapes_cpu", "small", "tiny", "wan2_1_t2v_14b", "wan2_1_t2v_1_3b"]


def test_shipped_configs_are_listed_and_build():
    assert available_configs() == SHIPPED
    for name in SHIPPED:
        models = build_models(load_config(name))
        assert models.dit.in_channels == models.vae.z_dim


def test_wan_configs_have_wan_parameter_counts():
    # Wan2.1's published transformer sizes: 1,418,996,800 and 14,288,491,584 parameters.
    assert param_counts(build_models(load_config("wan2_1_t2v_1_3b")))["dit"] == 1_418_996_800
    assert param_counts(build_models(load_config("wan2_1_t2v_14b")))["dit"] == 14_288_491_584


def test_load_by_path_with_arg(tmp_path):
    config = load_config("configs/wan2_1_t2v_14b.py:pod")
    assert config.mesh.fsdp == 32 and config.mesh.data == -1
    assert load_config("small:256").data.resolution == 256


def test_overrides_parse_types_and_suggest_keys():
    config = load_config("tiny")
    override(config, ["optim.lr=2", "dit.patch_size=[1,1,1]", "dit.scan_layers=true", "sample.sampler=euler"])
    assert config.optim.lr == 2.0 and isinstance(config.optim.lr, float)
    assert config.dit.patch_size == (1, 1, 1) and config.dit.scan_layers is True
    with pytest.raises(ValueError, match="unknown config key 'dit.widht'; did you mean 'dit.width'"):
        override(config, ["dit.widht=3"])
    with pytest.raises(ValueError, match="is int"):
        override(config, ["dit.width=wide"])
    with pytest.raises(ValueError, match="is a section"):
        override(config, ["dit=3"])
    with pytest.raises(ValueError, match="did you mean 'tiny'"):
        load_config("tyni")
    with pytest.raises(ValueError, match=r"unknown config key 'foo.bar' \(sections: data, dit, "):
        override(config, ["foo.bar=3"])
    # data.resolution takes a square size or an (H, W) pair, either way round
    assert override(load_config("tiny"), ["data.resolution=(16, 24)"]).data.resolution == (16, 24)
    assert override(load_config("tiny"), ["data.resolution=[16, 24]", "data.resolution=16"]).data.resolution == 16


@pytest.mark.parametrize("spec, message", [
    ("small:abc", r"small:abc: expected a frame size in pixels, a multiple of 16"),
    ("small:0", r"small:0: expected a frame size"),
    ("bench_cpu:abc", r"bench_cpu:abc: tokens per example must be one of \[256, 1024\]"),
    ("wan2_1_t2v_14b:bogus", r"config argument 'bogus': expected host \(one host\) or pod \(multi-host\)"),
    ("tiny:64", r"tiny:64: tiny takes no argument"),
    ("shapes_cpu:quick", r"shapes_cpu:quick: shapes_cpu takes no argument"),
])
def test_bad_config_arguments_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        load_config(spec)


def test_a_config_file_without_get_config(tmp_path):
    (tmp_path / "mine.py").write_text("CONFIG = {}\n")
    with pytest.raises(ValueError, match=r"config file '.*mine.py' defines no get_config\(arg=None\) function"):
        load_config(str(tmp_path / "mine.py"))


@pytest.mark.parametrize("source, message", [
    ("import not_a_module_anywhere\n",
     r"config file '.*mine.py' failed at line 1: ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    ("def get_config(arg=None):\n    c = {}\n    return c['vae']\n",
     r"config '.*mine.py:x': get_config\('x'\) failed at line 3: KeyError: 'vae'"),
    ("def get_config(arg=None):\n    return {'vae': {}}\n",
     r"get_config returned a dict, expected an ml_collections.ConfigDict"),
    ("import ml_collections\ndef get_config(arg=None):\n    return ml_collections.ConfigDict({'vae': {}})\n",
     r"config '.*mine.py:x' lacks the top-level keys cpu_devices, data, dit, .*: build it on .*base_config"),
])
def test_errors_in_a_users_config_file_are_one_line(tmp_path, capsys, source, message):
    from vdit.cli import main
    (tmp_path / "mine.py").write_text(source)
    spec = f"{tmp_path / 'mine.py'}:x"
    with pytest.raises(ValueError, match=message):
        load_config(spec)
    assert main(["train", "--config", spec, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vdit train: error: config") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_models_that_do_not_fit_are_rejected():
    config = override(load_config("tiny"), ["dit.in_channels=8"])
    with pytest.raises(ValueError, match="dit.in_channels=8 must equal vae.z_dim=4"):
        build_models(config)


def test_cli_info_and_one_line_errors():
    run = lambda *a: subprocess.run([sys.executable, "-m", "vdit", *a], capture_output=True, text=True)  # noqa: E731
    ok = run("info", "--config", "tiny", "--config.dit.depth", "3")
    assert ok.returncode == 0 and "dit" in ok.stdout and "parameters" in ok.stdout
    bad = run("info", "--config", "tiny", "--config.dit.detph=3")
    assert bad.returncode == 2
    expected = "vdit info: error: unknown config key 'dit.detph'; did you mean 'dit.depth'?"
    assert bad.stderr.strip().splitlines() == [expected]
    assert run("--help").returncode == 0 and run("convert", "--help").returncode == 0


def test_configs_and_every_module_ship_in_the_wheel(tmp_path):
    # `--config tiny` must work after a non-editable install: configs/ is packaged as vdit.configs.
    # And every module: a wheel without vdit/bench once lost the whole `vdit` command.
    import pathlib
    import shutil
    import zipfile

    repo = pathlib.Path(__file__).parent.parent
    # Built from a copy of the sources: setuptools reuses a checkout's build/ folder, whose
    # leftovers would hide a package the package list leaves out.
    src = tmp_path / "src"
    for name in ("vdit", "configs"):
        shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path), "-q"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("vdit-*.whl"))).namelist()
    assert {f"vdit/configs/{n}.py" for n in SHIPPED} <= set(names)
    assert "vdit/configs/_base.py" in names
    sources = {p.relative_to(repo).as_posix() for p in (repo / "vdit").rglob("*.py")}
    assert sources - set(names) == set(), "pyproject.toml [tool.setuptools] packages leaves these out of the wheel"


def test_override_none_unsets_a_key():
    config = override(load_config("shapes_cpu"), ["dit.activation_dtype=None", "dit.dtype=float32"])
    assert config.dit.activation_dtype is None
    assert build_models(config).dit.activation_dtype is None
    with pytest.raises(ValueError, match=r"config key 'dit.width' cannot be None: it is int \(\d+\) and has no unset"):
        override(load_config("tiny"), ["dit.width=None"])


def test_a_recorded_config_json_loads_as_the_config_it_records(tmp_path):
    config = override(load_config("shapes_cpu"), ["train.steps=7", "data.data_dir=/data"])
    path = tmp_path / "config.json"
    path.write_text(config.to_json_best_effort())
    loaded = load_config(str(path))
    assert loaded.to_dict() == config.to_dict()  # tuples come back as tuples
    assert override(loaded, ["dit.depth=2"]).dit.depth == 2  # locked and overridable like any config
    with pytest.raises(AttributeError):
        loaded.no_such_section = 1
    for text, match in (("{", "is not readable JSON"), ('{"dit": {}}', "not a config a vdit run recorded")):
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_config(str(path))
    with pytest.raises(ValueError, match=r"does not exist; a workdir records its config as W/vae/config.json"):
        load_config(str(tmp_path / "missing.json"))
