"""The README's usage example really runs and prints what it says."""

import re
from pathlib import Path

import torch


def test_readme_usage_example_runs(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    model, out = namespace["model"], namespace["out"]
    assert model.prototype_memory.initialized.all()  # the one training step set every prototype
    layers = out.sample_exit_layers
    assert layers.dtype == torch.long and layers.shape == (2,) and ((layers >= 1) & (layers <= 6)).all()
    assert out.speedup == 6 * 2 / layers.sum().item()  # docs/method.md eq. 12 over the two sentences
    assert capsys.readouterr().out == f"{layers} {out.speedup}\n"
