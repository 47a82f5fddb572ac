"""Weight conversion from diffusers' Wan2.1 into vdit, and the saved format.

``convert_folder(src, out)`` reads a diffusers model folder (``config.json`` and
``*.safetensors``, sharded or not; no torch needed) holding a
``WanTransformer3DModel`` or an ``AutoencoderKLWan``, or a pipeline folder with
``transformer/`` and ``vae/`` subfolders, and writes for each model
``out/<part>/model.json`` (the vdit class and constructor arguments) and
``out/<part>/params`` (an Orbax checkpoint). ``load_converted`` reads one back.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import numpy as np

CONVERTERS = {
    "WanTransformer3DModel": ("transformer", "DiT"),
    "AutoencoderKLWan": ("vae", "CausalVAE"),
}


def _safetensors_files(folder: pathlib.Path, *, read: bool = False) -> list[pathlib.Path] | dict[str, np.ndarray]:
    """The folder's weight files (their headers checked), or with ``read`` their tensors in f32."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {folder}; expected diffusers' saved weights there")
    state = {}
    for f in files:
        try:
            # The flax framework reads bfloat16 too (numpy alone cannot).
            with safe_open(str(f), framework="flax") as reader:
                for key in reader.keys() if read else ():
                    state[key] = np.asarray(reader.get_tensor(key), np.float32)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e}); is the download complete?") from None
    return state if read else files


def _read_config(folder: pathlib.Path) -> tuple[pathlib.Path, dict]:
    """A diffusers model folder's ``config.json``, checked to describe a model vdit converts."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ValueError(f"{folder} has no config.json; expected a diffusers model folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    source = config.get("_class_name") if isinstance(config, dict) else None
    if source not in CONVERTERS:
        raise ValueError(f"{config_path} describes {source!r}; vdit converts {sorted(CONVERTERS)}")
    return config_path, config


def convert_model_folder(folder: str | pathlib.Path) -> tuple[str, str, dict, Any]:
    """Converts one diffusers model folder; returns ``(part, class_name, kwargs, params)``."""
    from vdit.convert import wan_dit, wan_vae

    folder = pathlib.Path(folder)
    _, config = _read_config(folder)
    source = config["_class_name"]
    state = _safetensors_files(folder, read=True)
    if source == "WanTransformer3DModel":
        kwargs, params = wan_dit.convert_wan_dit(state, config)
    else:
        kwargs, params = wan_vae.convert_wan_vae(state, config)
    part, cls = CONVERTERS[source]
    return part, cls, kwargs, params


def convert_folder(src: str | pathlib.Path, out: str | pathlib.Path, *, overwrite: bool = False) -> list[str]:
    """Converts a diffusers model or pipeline folder into ``out``; returns the parts written.

    Refuses to write into an existing part folder unless ``overwrite``: nothing a user
    saved is replaced silently. Every source folder's config, weight files and
    destination are checked before anything is written, and each part is written
    beside its destination and moved into place only when complete.
    """
    import orbax.checkpoint as ocp

    src, out = pathlib.Path(src), pathlib.Path(out).absolute()
    if not src.is_dir():
        raise (NotADirectoryError(f"--src {src} is a file, expected a diffusers model folder") if src.exists() else
               FileNotFoundError(f"--src {src} does not exist; expected a diffusers model folder"))
    folders = [src] if (src / "config.json").exists() else [
        src / p for p, _ in CONVERTERS.values() if (src / p).is_dir()]
    if not folders:
        raise ValueError(f"{src} holds neither a diffusers model (config.json) nor transformer/ or vae/ subfolders")
    for folder in folders:
        _, config = _read_config(folder)
        _safetensors_files(folder)
        dest = out / CONVERTERS[config["_class_name"]][0]
        if dest.exists() and not overwrite:
            raise ValueError(f"{dest} already exists; pass overwrite=True (--overwrite) to replace it")
    written = []
    for folder in folders:
        try:
            part, cls, kwargs, params = convert_model_folder(folder)
        except ValueError as e:
            done = f" ({', '.join(str(out / p) for p in written)} already converted)" if written else ""
            raise ValueError(f"converting {folder}: {e}{done}") from None
        dest, partial = out / part, out / f".{part}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # a previous conversion that died mid-write
        partial.mkdir(parents=True)
        (partial / "model.json").write_text(json.dumps({"class": cls, "kwargs": kwargs}, indent=2))
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(partial / "params", params)
        if dest.exists():  # overwrite: the new part is complete, so the old one may go
            shutil.rmtree(dest)
        partial.rename(dest)
        written.append(part)
    return written


def load_converted(path: str | pathlib.Path) -> tuple[Any, Any]:
    """Loads ``out/<part>`` written by ``convert_folder``: returns ``(module, params)``."""
    import orbax.checkpoint as ocp

    from vdit.dit import DiT
    from vdit.vae import CausalVAE

    path = pathlib.Path(path).absolute()
    meta = json.loads((path / "model.json").read_text())
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["kwargs"].items()}
    module = {"DiT": DiT, "CausalVAE": CausalVAE}[meta["class"]](**kwargs)
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(path / "params")
    return module, params
