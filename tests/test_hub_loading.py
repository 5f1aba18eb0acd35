"""Loading by Hub id, as the model card tells users to: a saved checkpoint laid out in a `huggingface_hub` cache exactly
as a download leaves it, loaded offline by its repo id, with the package and, without it, through the code the
checkpoint carries (`trust_remote_code=True`, each code file fetched from the cache, relative imports included)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from huggingface_hub import scan_cache_dir, try_to_load_from_cache
from transformers import AutoTokenizer, pipeline

from de3_transformers import DE3BertForSequenceClassification, calibrate
from de3_transformers.model_card import build_model_card

from conftest import blocking_imports


REPO_ID = "org/de3-bert-sst2"
TEXTS = ["a gripping, funny film", "a dull, lifeless mess", "it has a plot", "the best thing all year",
         "i wanted my money back", "not bad at all", "an utter bore", "warm and wise"]
# Files that loading the model, tokenizer and pipeline by id looks for and the repo lacks (seen by spying on
# `hf_hub_download`): online the Hub answers 404, and `huggingface_hub` records each as an empty file under
# `.no_exist/<commit>/`, which later loads read instead of asking again.
ABSENT = ("added_tokens.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
          "special_tokens_map.json", "video_preprocessor_config.json", "vocab.txt")
# How the download was made: `snapshot_download` fetches every file and records nothing absent; loading by id online
# (the model card's lines) fetches what it needs and records the absent files it looked for.
DOWNLOADS = ("snapshot_download", "from_pretrained")


class Checkpoint(NamedTuple):
    folder: Path
    card_text: str
    expected: dict  # what the package answers on the folder: `pipeline` results and `predict_early` labels and layers


class HubCache(NamedTuple):
    cache: Path  # HF_HUB_CACHE
    snapshot: Path
    commit: str
    absent: tuple[str, ...]  # the files recorded in `.no_exist/<commit>/`


def etag(path: Path) -> str:
    """The name `huggingface_hub` stores a file's blob under: its Hub etag, the sha256 of the content for LFS files
    (weights), the git blob id for the others."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lay_out_as_downloaded(folder: Path, cache: Path, repo_id: str, absent: tuple[str, ...] = ()) -> tuple[Path, str]:
    """Stores the files of `folder` in the Hub cache `cache` as `huggingface_hub` stores a download of `repo_id`
    (`file_download.py`): each file once in `blobs/<etag>`, the commit's files as relative symlinks to them in
    `snapshots/<commit>/`, `refs/main` holding the commit, and each of `absent` as an empty `.no_exist/<commit>/` file.

    Returns:
        The snapshot folder and the commit.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    etags = {path.name: etag(path) for path in sorted(folder.iterdir())}
    commit = hashlib.sha1(json.dumps(etags, sort_keys=True).encode()).hexdigest()  # any 40 hex digits would do
    snapshot, blobs = repo / "snapshots" / commit, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for name, tag in etags.items():
        shutil.copyfile(folder / name, blobs / tag)
        os.symlink(os.path.relpath(blobs / tag, snapshot), snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)  # no newline: `huggingface_hub` reads the commit as the file's text
    if absent:
        (repo / ".no_exist" / commit).mkdir(parents=True)
        for name in absent:
            (repo / ".no_exist" / commit / name).touch()
    return snapshot, commit


@pytest.fixture(scope="module")
def checkpoint(minilm_path, tmp_path_factory):
    """The real MiniLM as a DE3 model, its prototypes set by one labelled training-mode forward and its threshold
    calibrated for 2x, so texts leave at different layers; saved with its tokenizer and the model card built for
    `REPO_ID`, as the Hub repo holds them. Also what the package answers on the folder: the expected answers by id."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = DE3BertForSequenceClassification.from_backbone(
        minilm_path, num_labels=2, exit_pooling="mean",
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
    )
    labels = [index % 2 for index in range(len(TEXTS))]
    model.train()
    with torch.no_grad():  # prototypes are set by the forward itself
        model(**tokenizer(TEXTS, padding=True, return_tensors="pt"), labels=torch.tensor(labels))
    model.eval()
    calibrate(model, [dict(tokenizer(text), label=label) for text, label in zip(TEXTS, labels)], target_speedup=2.0)
    folder = tmp_path_factory.mktemp("de3") / "de3-bert-sst2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    card = build_model_card(model, task_name="sst2", dataset_name="nyu-mll/glue", model_name=REPO_ID)
    card.save(folder / "README.md")

    classifier = pipeline("text-classification", model=str(folder))
    early = classifier.model.predict_early(**classifier.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    expected = {"pipeline": classifier(TEXTS, return_exit_layer=True),
                "predict_early": {"labels": early.logits.argmax(-1).tolist(),
                                  "exit_layers": early.sample_exit_layers.tolist()}}
    assert len({result["exit_layer"] for result in expected["pipeline"]}) > 1  # texts really leave at several layers
    return Checkpoint(folder, card.text, expected)


@pytest.fixture(scope="module", params=DOWNLOADS)
def hub_cache(request, checkpoint, tmp_path_factory):
    """The checkpoint as a download of `REPO_ID` left it in a fresh Hub cache."""
    cache = tmp_path_factory.mktemp("hub") / "hub"
    absent = ABSENT if request.param == "from_pretrained" else ()
    return HubCache(cache, *lay_out_as_downloaded(checkpoint.folder, cache, REPO_ID, absent=absent), absent)


def card_code(card_text: str) -> tuple[str, str]:
    """The Python of the card's "How to use": the lines for users with the package, and those without it."""
    usage = card_text.split("\n## How to use\n", 1)[1].split("\n## ", 1)[0]
    with_package, without_package = usage.split("Without the package", 1)
    blocks = [block.split("```", 1)[0] for block in with_package.split("```python\n")[1:]]
    (remote,) = [block.split("```", 1)[0] for block in without_package.split("```python\n")[1:]]
    assert len(blocks) == 2, "the card shows the pipeline, then the model"
    return "".join(blocks), remote


def run_offline(script: str, cache: Path, tmp_path: Path) -> dict:
    """Runs `script` in a fresh Python with the Hub cache `cache`, offline, and a fresh modules cache for remote code;
    returns the JSON its last line prints."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_MODULES_CACHE", "HF_HUB_CACHE")}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               TRANSFORMERS_VERBOSITY="error", PYTHONPATH="")
    # stdin closed: an interactive "run the custom code? [y/N]" prompt would fail the run rather than wait.
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def labels_and_layers(results: list[dict]) -> list[tuple[str, int]]:
    return [(result["label"], result["exit_layer"]) for result in results]


def test_the_cache_is_laid_out_as_huggingface_hub_stores_a_download(checkpoint, hub_cache):
    scanned = scan_cache_dir(hub_cache.cache)  # huggingface_hub's own reader, which reports what it finds malformed
    assert not scanned.warnings
    (repo,) = scanned.repos
    assert repo.repo_id == REPO_ID and repo.repo_type == "model" and set(repo.refs) == {"main"}
    (revision,) = repo.revisions
    assert revision.commit_hash == hub_cache.commit and revision.snapshot_path == hub_cache.snapshot
    assert {file.file_name for file in revision.files} == {path.name for path in checkpoint.folder.iterdir()}
    for file in revision.files:
        assert file.file_path.is_symlink() and file.blob_path.name == etag(checkpoint.folder / file.file_name)
    weights = try_to_load_from_cache(REPO_ID, "model.safetensors", cache_dir=hub_cache.cache)
    assert Path(weights) == hub_cache.snapshot / "model.safetensors"
    vocab = try_to_load_from_cache(REPO_ID, "vocab.txt", cache_dir=hub_cache.cache)
    if "vocab.txt" in hub_cache.absent:  # known absent: neither a path nor None (the library's sentinel)
        assert vocab is not None and not isinstance(vocab, str)
    else:  # unknown
        assert vocab is None


# Loading by id resolves files the same way with and without the package: one layout here is enough.
@pytest.mark.parametrize("hub_cache", ["from_pretrained"], indirect=True)
def test_with_the_package_the_cards_lines_load_model_tokenizer_and_pipeline_by_hub_id(checkpoint, hub_cache, tmp_path):
    lines, _ = card_code(checkpoint.card_text)
    assert f'"{REPO_ID}"' in lines
    script = lines + textwrap.dedent(f"""
        import json
        from de3_transformers import DE3BertForSequenceClassification, DE3TextClassificationPipeline
        assert type(model) is DE3BertForSequenceClassification and type(classifier) is DE3TextClassificationPipeline
        assert type(classifier.model) is DE3BertForSequenceClassification
        early = model.predict_early(**tokenizer({TEXTS!r}, padding=True, return_tensors="pt"))
        print(json.dumps({{"names": [model.name_or_path, tokenizer.name_or_path, classifier.model.name_or_path],
                          "pipeline": classifier({TEXTS!r}, return_exit_layer=True),
                          "predict_early": {{"labels": early.logits.argmax(-1).tolist(),
                                            "exit_layers": early.sample_exit_layers.tolist()}}}}))
    """)
    loaded = run_offline(script, hub_cache.cache, tmp_path)
    expected = checkpoint.expected
    assert loaded["names"] == [REPO_ID] * 3
    assert labels_and_layers(loaded["pipeline"]) == labels_and_layers(expected["pipeline"])
    assert [r["score"] for r in loaded["pipeline"]] == pytest.approx([r["score"] for r in expected["pipeline"]],
                                                                      abs=1e-5)
    assert loaded["predict_early"] == expected["predict_early"]


def test_without_the_package_the_cards_lines_load_the_checkpoints_code_by_hub_id(checkpoint, hub_cache, tmp_path):
    _, lines = card_code(checkpoint.card_text)
    assert lines.count(f'"{REPO_ID}", trust_remote_code=True') == 3
    script = blocking_imports("de3_transformers", "de3_onnx") + lines + textwrap.dedent(f"""
        import json
        from transformers import AutoModel
        base = AutoModel.from_pretrained({REPO_ID!r}, trust_remote_code=True)
        assert "de3_transformers" not in sys.modules and "de3_onnx" not in sys.modules
        early = model.predict_early(**tokenizer({TEXTS!r}, padding=True, return_tensors="pt"))
        print(json.dumps({{"modules": [type(item).__module__ for item in (model, base, classifier.model, classifier)],
                          "classes": [type(item).__name__ for item in (model, base, classifier)],
                          "pipeline": classifier({TEXTS!r}, return_exit_layer=True),
                          "predict_early": {{"labels": early.logits.argmax(-1).tolist(),
                                            "exit_layers": early.sample_exit_layers.tolist()}}}}))
    """)
    remote = run_offline(script, hub_cache.cache, tmp_path)
    expected = checkpoint.expected
    # The code of this commit of the repo, copied with every file it imports into the fresh modules cache.
    assert remote["classes"] == ["DE3BertForSequenceClassification"] * 2 + ["DE3TextClassificationPipeline"]
    packages = {module.rsplit(".", 1)[0] for module in remote["modules"]}
    assert [module.rsplit(".", 1)[1] for module in remote["modules"]] == ["modeling_de3"] * 3 + ["pipeline_de3"]
    (package,) = packages
    assert package.startswith("transformers_modules.") and hub_cache.commit in package
    copied = tmp_path / "hf_home" / "modules" / Path(*package.split("."))
    assert {path.name for path in hub_cache.snapshot.glob("*.py")} <= {path.name for path in copied.glob("*.py")}
    assert labels_and_layers(remote["pipeline"]) == labels_and_layers(expected["pipeline"])
    assert [r["score"] for r in remote["pipeline"]] == pytest.approx([r["score"] for r in expected["pipeline"]],
                                                                      abs=1e-5)
    assert remote["predict_early"] == expected["predict_early"]
