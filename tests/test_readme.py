"""The README's usage example really runs."""

import re
from pathlib import Path


def test_readme_usage_example_runs(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "tensor([" in printed and "." in printed.split(")")[-1]
