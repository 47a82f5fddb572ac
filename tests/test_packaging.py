"""The installed package is the source tree: a non-editable install (the TPU launcher's
``pip install vdit[tpu] @ git+...``, a wheel) ships every module the CLI imports."""

import pathlib
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _listed() -> tuple[set[str], dict[str, str]]:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(setuptools["packages"]), setuptools.get("package-dir", {})


def test_every_package_under_vdit_is_listed():
    packages, _ = _listed()
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "vdit").rglob("__init__.py")}
    missing = sorted(on_disk - packages)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}: a wheel would not ship them"
    assert {p for p in packages if p != "vdit.configs"} <= on_disk


def test_shipped_configs_are_the_configs_folder():
    packages, package_dir = _listed()
    assert "vdit.configs" in packages and package_dir.get("vdit.configs") == "configs"
    assert (REPO / "configs" / "__init__.py").exists()
