"""Configs shipped with vdit: each module has ``get_config(arg=None) -> ConfigDict``.

Load them with ``vdit.config.load_config("tiny")`` or ``--config configs/tiny.py``.
"""
