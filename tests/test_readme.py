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
