"""Saving and loading DE3 checkpoints: atomic saves, load errors that say what is wrong, and `from_backbone`, which
starts a DE3 model from a plain pretrained BERT / RoBERTa checkpoint."""

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig
from transformers.utils import logging

from .pipeline_de3 import custom_pipelines_entry
from .prototypes import describe_problems


logger = logging.get_logger(__name__)


class DE3CheckpointMixin:
    """The checkpoint methods of the DE3 models (mixed in before `PreTrainedModel`, whose methods they wrap)."""

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`, made atomic: everything is written to a temporary folder beside
        `save_directory` and then moved in file by file with `os.replace`, weights first, so a crash while saving
        leaves the previous checkpoint in `save_directory` loadable. Other files in the folder (a tokenizer, Trainer
        checkpoints) are kept; stale weight shards of an earlier save are removed.

        Raises:
            OSError: if the folder cannot be written.
            huggingface_hub.errors.StrictDataclassClassValidationError: if a config field was set to an invalid value
                after the config was built (the error names it); nothing is written then.
            FloatingPointError: if a prototype is not finite (training diverged); nothing is written then.
        """
        self.prototype_memory.require_finite()
        with self._checkpoint_code_named():
            if push_to_hub:  # uploading works on the folder itself: keep the library's own path
                return super().save_pretrained(save_directory, *args, push_to_hub=True, **kwargs)
            target = Path(save_directory)
            target.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.saving-") as staging:
                super().save_pretrained(staging, *args, **kwargs)
                written = sorted(Path(staging).iterdir(), key=lambda path: ".safetensors" not in path.name)
                for stale in target.glob("model*.safetensors*"):
                    if not (Path(staging) / stale.name).exists():
                        stale.unlink()
                for path in written:
                    os.replace(path, target / path.name)

    @contextlib.contextmanager
    def _checkpoint_code_named(self):
        """Names in the config the code saved beside the weights (`save_pretrained` copies this module's file and
        every file it imports), so `trust_remote_code=True` reaches it without the package: `AutoModel` besides the
        `AutoModelForSequenceClassification` that `register_for_auto_class` names (kept, as transformers keeps
        `auto_map`), and the early-exit pipeline (written to the file only: the package serves it where installed,
        so a loaded config never has it, and the saved model's config stays equal to the loaded one)."""
        model_file = type(self).__module__.rsplit(".", 1)[-1]
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}),
                                "AutoModel": f"{model_file}.{type(self).__name__}"}
        self.config.custom_pipelines = custom_pipelines_entry()
        try:
            yield
        finally:
            del self.config.custom_pipelines

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, which also verifies what it loaded: the heads run after the layers they
        were trained at, and the prototypes are consistent. Errors say what is wrong for a corrupted weights file and
        for a config whose `num_labels` or `exit_layers` do not fit the saved heads and prototypes (the saved values
        are read from the weights). With `ignore_mismatched_sizes=True`, prototypes of another shape come back
        uninitialised, to be set by training.

        Raises:
            OSError: if the weights file is corrupted or truncated, or its prototypes are inconsistent (set while
                marked uninitialised, or marked initialised but not finite or zero).
            ValueError: if the config does not fit the saved weights (and `ignore_mismatched_sizes` is not set), or
                its `exit_layers` are not the layers the exits were trained at.
        """
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"The weights of {pretrained_model_name_or_path} are corrupted or truncated ({error}). Save the model "
                "again, or download it again; saving with save_pretrained never leaves a half-written file."
            ) from error
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            num_labels, exit_layers = _saved_heads(cls, pretrained_model_name_or_path)
            raise ValueError(
                f"The config does not fit the weights saved in {pretrained_model_name_or_path}, which have "
                f"num_labels={num_labels} and exit_layers={exit_layers}. Load the checkpoint with its own "
                "config, or pass ignore_mismatched_sizes=True to start the heads and prototypes that differ afresh."
            ) from error
        _verify_loaded(model, pretrained_model_name_or_path, info)
        return (model, info) if wants_info else model

    @classmethod
    def from_backbone(cls, pretrained_model_name_or_path, num_labels: int = 2, **kwargs):
        """Starts a DE3 model from a plain pretrained backbone checkpoint (e.g. `bert-base-uncased`, MiniLM).

        The backbone weights are loaded; the exit heads, prototypical networks and prototypes are freshly
        initialised, and a warning lists them. Keyword arguments that are config fields (the DE3 options such
        as `dar_alpha`, `exit_layers`, `distance`, or backbone fields such as `hidden_dropout_prob`) go to the
        config; the rest (`dtype`, `attn_implementation`, `local_files_only`, ...) go to `from_pretrained`.

        Raises:
            ValueError: if the checkpoint is not of this class's backbone architecture, or a DE3 option is invalid.
        """
        config_class = cls.config_class
        config_fields = {field.name for field in dataclasses.fields(config_class)} | {"id2label", "label2id"}
        config_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in config_fields}
        loading_keys = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "subfolder")
        backbone_config = AutoConfig.from_pretrained(
            pretrained_model_name_or_path, **{key: kwargs[key] for key in loading_keys if key in kwargs}
        )
        backbone_type = cls.base_model_prefix  # "bert" / "roberta", also the backbone's model_type
        if backbone_config.model_type != backbone_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} is a {backbone_config.model_type!r} checkpoint but {cls.__name__} "
                f"needs a {backbone_type!r} one. To reload a saved DE3 model use from_pretrained."
            )
        values = {
            key: value
            for key, value in backbone_config.to_dict().items()
            if key not in ("model_type", "architectures", "transformers_version", "id2label", "label2id")
        }
        if "id2label" not in config_kwargs:
            values["num_labels"] = num_labels
        config = config_class(**{**values, **config_kwargs})
        # transformers reports every missing tensor in a table; here they are the new heads, expected, and said in one
        # line below, with any tensor of the checkpoint that was not used.
        with _load_report_silenced():
            model, info = cls.from_pretrained(
                pretrained_model_name_or_path, config=config, output_loading_info=True, **kwargs
            )
        mean_pooled = Path(str(pretrained_model_name_or_path), "1_Pooling", "config.json")
        if config.exit_pooling == "first" and mean_pooled.is_file():
            if json.loads(mean_pooled.read_text()).get("pooling_mode_mean_tokens"):
                logger.warning(
                    f"{pretrained_model_name_or_path} is a sentence-transformers checkpoint trained with mean pooling: "
                    "its first token carries little sentence information in early layers, so shallow exits learn "
                    "slowly. Consider exit_pooling='mean'."
                )
        fresh = sorted({key.split(".")[0] for key in info["missing_keys"]})
        unused = sorted(info["unexpected_keys"])
        logger.warning(
            f"{cls.__name__}: backbone weights loaded from {pretrained_model_name_or_path}. Freshly initialised, to "
            f"be trained before use: {', '.join(fresh) or 'nothing'} "
            f"({len(info['missing_keys'])} tensors). Prototypes start uninitialised and are set by training batches."
            + (f" Not used, from the checkpoint: {', '.join(unused)}." if unused else "")
        )
        return model


def _not_a_load_report(record) -> bool:
    return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _load_report_silenced():
    """transformers' loading report (a table of missing and unexpected tensors) is not logged inside the block; its
    errors still raise, and the logger's other messages pass. A filter rather than a level: transformers runs other
    checks depending on that logger's level."""
    modeling_logger = logging.get_logger("transformers.modeling_utils")
    modeling_logger.addFilter(_not_a_load_report)
    try:
        yield
    finally:
        modeling_logger.removeFilter(_not_a_load_report)


def _verify_loaded(model, path, info: dict) -> None:
    """Checks a loaded DE3 model against what its weights say (see `DE3CheckpointMixin.from_pretrained`)."""
    memory, config = model.prototype_memory, model.config
    mismatched = {entry[0] if isinstance(entry, (tuple, list)) else entry for entry in info.get("mismatched_keys", ())}
    if mismatched & {"prototype_memory.prototypes", "prototype_memory.initialized"}:
        # `ignore_mismatched_sizes` re-creates the tensors that changed shape; a mask that kept its shape would still
        # call the fresh zero prototypes initialised.
        with torch.no_grad():
            memory.prototypes.zero_()
            memory.initialized.zero_()
        logger.warning(f"{path}: the prototypes have another shape than the config's; they start uninitialised.")
    recorded = "prototype_memory.exit_layers" not in set(info.get("missing_keys", ())) | mismatched
    trained_at = memory.exit_layers.tolist() + [config.num_hidden_layers]
    if recorded and trained_at != list(config.exit_layers):
        raise ValueError(
            f"The exits saved in {path} were trained after layers {trained_at}, but the config puts them after "
            f"{list(config.exit_layers)}: each head would read another layer than it learned. Load the checkpoint with "
            f"its own config (exit_layers={trained_at}), or start from the backbone (from_backbone) to train exits at "
            "other layers."
        )
    inconsistent = memory.inconsistent_pairs()
    if inconsistent:
        raise OSError(
            f"The prototypes saved in {path} are inconsistent ({describe_problems(inconsistent)}): the weights file is "
            "corrupted, or it was saved after training diverged. Save or download the checkpoint again, or train again."
        )


def _saved_heads(model_class, path) -> tuple[int | str, list[int] | str]:
    """`(num_labels, exit_layers)` as the weights in `path` have them (the saved config where the weights cannot be
    read, e.g. a Hub id not in the cache)."""
    saved_config = model_class.config_class.from_pretrained(path)
    shapes, exit_layers = {}, None
    folder = Path(str(path))
    index = folder / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():  # sharded
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    for name in files:
        if not (folder / name).is_file():
            return saved_config.num_labels, saved_config.exit_layers
        with safe_open(folder / name, framework="pt") as weights:
            for key in weights.keys():
                shapes[key] = weights.get_slice(key).get_shape()
            if "prototype_memory.exit_layers" in weights.keys():
                exit_layers = weights.get_tensor("prototype_memory.exit_layers").tolist()
    if "classifier.weight" not in shapes:
        return saved_config.num_labels, saved_config.exit_layers
    num_labels = shapes["classifier.weight"][0]
    if exit_layers is None:  # saved before the exit layers were recorded: their count is all the weights say
        below_top = shapes.get("prototype_memory.prototypes", [0])[0]
        return num_labels, f"{below_top + 1} exits"
    return num_labels, exit_layers + [saved_config.num_hidden_layers]


__all__ = ["DE3CheckpointMixin"]
