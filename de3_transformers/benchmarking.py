"""Helpers shared by the benchmark scripts under `benchmarks/`."""

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), else what `platform` knows."""
    fallback = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return fallback
    names = (line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name"))
    return next(names, fallback)


def hardware(device=None) -> str:
    """What a benchmark ran on: the GPU's name for a CUDA device (the default where CUDA is available), else the CPU
    model and torch's thread count."""
    import torch

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def plain_model(model):
    """The plain `BertForSequenceClassification` users would run instead of the DE3 BERT model `model`: the same
    backbone weights and its last classifier, no exits, in eval mode (the baseline every benchmark compares with)."""
    import transformers

    config = transformers.BertConfig(**{key: value for key, value in model.config.to_dict().items()
                                        if key in transformers.BertConfig().to_dict()})
    plain = transformers.BertForSequenceClassification(config)
    plain.bert.load_state_dict(model.bert.state_dict())
    plain.classifier.load_state_dict(model.classifier.state_dict())
    return plain.eval()


def write_report(text: str, path) -> Path:
    """Writes a benchmark's markdown report (creating its folder), prints it, and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(text)
    return path


__all__ = ["cpu_name", "hardware", "plain_model", "write_report"]
