"""The README's library example runs as written."""

import pathlib
import re


def test_readme_python_example_runs():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    x0 = namespace["x0"]
    assert x0.shape == (1, 2, 4, 4, 4)
    assert bool(abs(x0).max() < 1e3)


def test_readme_parameter_table_matches_vdit_info():
    from vdit.config import load_config
    from vdit.models import build_models, param_counts

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    rows = re.findall(r"^\|`(\w+)`[^|]*\|([\d,]+)\|([\d,]+)\|([\d,]+)\|([\d,]+)\|$", readme.replace(" ", ""), re.M)
    assert len(rows) == 5
    for name, *numbers in rows:
        counts = param_counts(build_models(load_config(name)))
        assert [int(n.replace(",", "")) for n in numbers] == [counts[k] for k in ("vae", "text", "dit", "total")], name
