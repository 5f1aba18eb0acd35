"""Model cards for DE3 checkpoints, in the Hugging Face Hub format.

`build_model_card` turns a DE3 model and what was measured on it into a `huggingface_hub.ModelCard`: the YAML
metadata (`library_name`, `tags`, `datasets`, `metrics`, `base_model`, `license`, `model-index`) comes from
`ModelCardData` and `EvalResult`, the text from `model_card_template.md` beside this module. Every number in a card
comes from the arguments; a section whose data was not given is left out.

The module is longer than the others (as setfit's `model_card.py` is) because each section of the template has its
own small formatting function; they read top to bottom in the template's order, and none is used elsewhere.
"""

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .exit_policies import build_exit_policy
from .objectives import get_training_objective


TEMPLATE = "model_card_template.md"
TAGS = ["de3-transformers", "early-exit", "text-classification"]
TASK_TYPE = "text-classification"
# The layer speed-ups (docs/method.md eq. 12) whose nearest calibration-curve points make the trade-off table.
TRADEOFF_SPEEDUPS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
CALIBRATION_FIELDS = ("threshold", "lam", "target_speedup", "speedup", "accuracy", "full_accuracy", "metrics", "curve")
EVAL_SETTINGS = ("full_model", "early_exit")
# Keys of `Trainer.evaluate()` that measure the run, not the model.
_NOT_CARD_METRICS = {"loss", "runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time"}

_BACKBONES = {"de3_bert": "BERT", "de3_roberta": "RoBERTa"}
_METRIC_NAMES = {"accuracy": "Accuracy", "f1": "F1", "matthews_correlation": "Matthews correlation"}
_TRAINING_LABELS = {
    "base_model": "Base model",
    "dataset": "Dataset",
    "train_samples": "Training samples",
    "epochs": "Epochs",
    "batch_size": "Batch size",
    "learning_rate": "Learning rate",
    "max_seq_length": "Max sequence length",
    "dar_type": "DAR type",
    "dar_alpha": "DAR alpha",
    "dar_beta": "DAR beta",
    "distance": "Distance",
    "prototype_momentum": "Prototype momentum",
    "exit_layers": "Exit layers",
    "training_objective": "Training objective",
    "token_exit_ratio": "Token exit ratio R_ee (after layers)",
    "exit_memory": "Exit classifier memory lambda",
    "hardware": "Hardware",
    "training_time": "Training time",
}
# Read from the model's config when `training_setup` does not give them: the DE3 training hyper-parameters.
_CONFIG_TRAINING_FIELDS = (
    "dar_type", "dar_alpha", "distance", "prototype_momentum", "exit_layers", "training_objective",
)
# A Hub model id, `name` or `owner/name`; anything else (a local folder) stays out of the YAML `base_model`.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def build_model_card(
    model,
    *,
    task_name: str,
    dataset_name: str,
    base_model: str | None = None,
    training_setup: dict | None = None,
    eval_metrics: dict | None = None,
    calibration=None,
    tradeoff_rows=None,
    license: str = "apache-2.0",
    language: str = "en",
    model_name: str | None = None,
) -> ModelCard:
    """Builds the model card of a DE3 model.

    Args:
        model: a DE3 model (or its config): supplies `model_type`, `num_hidden_layers`, `exit_layers`,
            `id2label`, the DAR settings and the `early_exit_threshold` / `early_exit_lambda` defaults.
        task_name: the task, e.g. `"rte"` or `"sentiment"`.
        dataset_name: the dataset id, e.g. `"nyu-mll/glue"`; goes to the YAML `datasets` and the `model-index`.
        base_model: the checkpoint the model was fine-tuned from. It goes to the YAML `base_model` only when it
            looks like a Hub id; a local folder is named by its last component in the text.
        training_setup: hyper-parameters to tabulate, e.g. `train_samples`, `epochs`, `batch_size`,
            `learning_rate`, `hardware`, `training_time`; unknown keys are shown under their own name. The DE3
            settings (`dar_type`, `dar_alpha`, `distance`, `prototype_momentum`, `exit_layers`) default to the
            config's.
        eval_metrics: evaluation results, either flat in `DE3Trainer`'s naming (`trainer.evaluate()` as it is, or
            without the `eval_` prefix: `{"accuracy": ...}` and
            `full_<metric>` for the full model, `early_exit_<metric>` for early exit, `early_exit_speedup` for
            its layer speed-up) or nested (`{"full_model": {...}, "early_exit": {...}}`). They fill the
            `model-index` (task `text-classification`) and the evaluation table.
        calibration: the calibrated early-exit setting: any object with `threshold`, `lam`, `target_speedup`,
            `speedup`, `accuracy`, `full_accuracy`, `metrics` (dict) and `curve` (points with `threshold`,
            `lam`, `speedup`, `accuracy`, `metrics`).
        tradeoff_rows: the rows of the trade-off table, objects or mappings with `threshold`, `speedup`,
            `accuracy` and optionally `lam`, `setting` and `metrics`; other numeric keys of a mapping are shown
            as metrics. Defaults to the points of `calibration.curve` nearest to 1x, 1.5x, 2x, 2.5x, 3x and 4x.
        license, language: the YAML `license` and `language`.
        model_name: the model's name on the Hub, used in the title, the usage example and the `model-index`;
            defaults to the last component of the model's `name_or_path`.

    Returns:
        A `huggingface_hub.ModelCard`.

    Raises:
        ValueError: if `task_name` or `dataset_name` is missing, the model's config is not a DE3 config (it has no
            `exit_layers`), or a metric value is not a finite number.
        TypeError: if `calibration` lacks one of the attributes listed above.
    """
    if not isinstance(task_name, str) or not task_name.strip():
        raise ValueError("task_name is required: name the task the model classifies for, e.g. 'rte' or 'sentiment'.")
    if not isinstance(dataset_name, str) or not dataset_name.strip():
        raise ValueError("dataset_name is required: give the dataset the model was trained on, e.g. 'nyu-mll/glue'.")
    config = getattr(model, "config", model)
    if getattr(config, "exit_layers", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no DE3 config (its config has no `exit_layers`); model cards are built for "
            "DE3BertForSequenceClassification or DE3RobertaForSequenceClassification models."
        )
    if calibration is not None:
        missing = [name for name in CALIBRATION_FIELDS if not hasattr(calibration, name)]
        if missing:
            raise TypeError(f"calibration ({type(calibration).__name__}) lacks the attributes {missing}.")

    name_or_path = str(getattr(config, "name_or_path", "") or "")
    model_name = model_name or Path(name_or_path).name or f"{config.model_type}-{task_name}"
    hub_base_model = base_model if base_model and _is_hub_id(base_model) else None
    evaluation = _split_eval_metrics(eval_metrics or {})
    metric_types = list(dict.fromkeys(name for setting in EVAL_SETTINGS for name in evaluation[setting]))
    if not metric_types and calibration is not None:
        metric_types = list(dict.fromkeys(["accuracy", *(calibration.metrics or {})]))
    metric_types = [name for name in metric_types if name != "speedup"]  # a cost, not a quality metric
    early_exit = _early_exit_setting(config, calibration)
    eval_results = _eval_results(evaluation, early_exit, task_name, dataset_name)

    card_data = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        pipeline_tag=TASK_TYPE,
        tags=[*TAGS, config.model_type],
        datasets=[dataset_name],
        metrics=metric_types or None,
        base_model=hub_base_model,
        # The name only labels the model-index; without results it would be a stray key in the YAML.
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    template = files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        description=_description(config, model_name, task_name, dataset_name, base_model),
        training_rows=_training_rows(config, dataset_name, base_model, training_setup),
        calibration_rows=_calibration_rows(calibration),
        calibrated=_calibrated_note(config, calibration),
        tradeoff=_tradeoff_table(calibration, tradeoff_rows),
        evaluation=_evaluation_table(config, evaluation, early_exit),
    )


def write_model_card(save_directory, model, **kwargs) -> Path:
    """Builds the model card (same keyword arguments as `build_model_card`) and writes it to
    `save_directory/README.md`, creating the folder if needed. `model_name` defaults to the folder's name.

    Returns:
        The path of the written `README.md`.

    Raises:
        ValueError, TypeError: as `build_model_card`.
    """
    save_directory = Path(save_directory)
    kwargs.setdefault("model_name", save_directory.resolve().name)
    card = build_model_card(model, **kwargs)
    save_directory.mkdir(parents=True, exist_ok=True)
    path = save_directory / "README.md"
    card.save(path)
    return path


# Formatting: every number shown is one of the arguments, rounded for reading.


def _metric(value) -> str:
    return f"{value:.4f}"


def _speedup(value) -> str:
    return f"{value:.2f}x"


def _setting(value) -> str:
    """A threshold or lambda."""
    return f"{value:.4g}"


def _cell(value) -> str:
    """A markdown table cell: numbers compact, lists joined, `|` escaped so it does not split the row."""
    if isinstance(value, bool):
        text = str(value)
    elif isinstance(value, numbers.Integral):
        text = str(value)
    elif isinstance(value, numbers.Real):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_cell(item) for item in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _metric_label(name: str) -> str:
    return _METRIC_NAMES.get(name, name.replace("_", " ").capitalize())


def _is_hub_id(name: str) -> bool:
    return _HUB_ID.match(name) is not None and not Path(name).exists()


def _base_model_text(base_model: str) -> str:
    if _is_hub_id(base_model):
        return f"[{base_model}](https://huggingface.co/{base_model})"
    # A local folder: its full path would say nothing to a reader of the Hub page (and may be private).
    return f"`{Path(base_model).name}` (a local checkpoint)"


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what}={value!r} must be a finite number.")
    return float(value)


def _get(row, name: str, default=None):
    if isinstance(row, Mapping):
        return row.get(name, default)
    return getattr(row, name, default)


# Sections. Each returns None (or an empty list) when its data is absent, and the template leaves it out.


def _description(config, model_name: str, task_name: str, dataset_name: str, base_model: str | None) -> dict:
    id2label = getattr(config, "id2label", None) or {}
    return {
        "title": model_name,
        "repo_id": model_name,
        "backbone": _BACKBONES.get(config.model_type, config.model_type),
        "model_type": config.model_type,
        "base_model": _base_model_text(base_model) if base_model else None,
        "task_name": task_name,
        "dataset_name": dataset_name,
        "num_layers": config.num_hidden_layers,
        "exit_layers": _cell(list(config.exit_layers)),
        "num_exits": len(config.exit_layers),
        "distance": config.distance,
        "labels": ", ".join(f"`{index}` {_cell(label)}" for index, label in sorted(id2label.items())),
        "threshold": _setting(config.early_exit_threshold),
        "lam": _setting(config.early_exit_lambda),
        "objective": get_training_objective(config.training_objective).card_description,
    }


def _training_rows(config, dataset_name: str, base_model: str | None, setup: dict | None) -> list[tuple[str, str]]:
    if not setup:
        return []
    values = {"base_model": base_model, "dataset": dataset_name}
    values.update({name: getattr(config, name) for name in _CONFIG_TRAINING_FIELDS})
    if config.dar_type == "combined":  # beta weighs the alienation term only in the combined DAR (eq. 4)
        values["dar_beta"] = config.dar_beta
    if config.token_exit:
        values["token_exit_ratio"] = f"{config.token_exit_ratio:g} ({_cell(list(config.token_exit_layers))})"
    if config.exit_memory != 1:
        values["exit_memory"] = config.exit_memory
    values.update(setup)  # what training actually used wins over the defaults above
    values = {key: value for key, value in values.items() if value is not None}
    order = [key for key in _TRAINING_LABELS if key in values] + [key for key in values if key not in _TRAINING_LABELS]
    # The base model cell is markdown already (a link or a code span); escaping it as text would break it.
    cells = {key: _base_model_text(str(value)) if key == "base_model" else _cell(value) for key, value in values.items()}
    return [(_TRAINING_LABELS.get(key, key), cells[key]) for key in order]


def _calibration_rows(calibration) -> list[tuple[str, str]]:
    if calibration is None:
        return []
    policy = getattr(calibration, "policy", "de3")
    rows = [
        ("Exit policy", None if policy == "de3" else f"`{policy}` {getattr(calibration, 'parameters', {})}", str),
        ("Threshold", calibration.threshold, _setting),
        ("Lambda", calibration.lam, _setting),
        ("Target layer speed-up", calibration.target_speedup, _speedup),
        ("Measured layer speed-up", calibration.speedup, _speedup),
        ("Accuracy, early exit", calibration.accuracy, _metric),
        ("Accuracy, full model", calibration.full_accuracy, _metric),
    ]
    rows += [
        (f"{_metric_label(name)}, early exit", value, _metric)
        for name, value in (calibration.metrics or {}).items()
        if name != "accuracy"
    ]
    return [(label, fmt(value)) for label, value, fmt in rows if value is not None]


def _calibrated_note(config, calibration) -> dict | None:
    """Whether the saved config's exit defaults are the calibrated setting, and if not, what to pass instead."""
    if calibration is None or getattr(calibration, "policy", "de3") != "de3":
        return None  # the note is written for DE3's threshold and lambda; other policies show their parameters
    saved = (config.early_exit_threshold, config.early_exit_lambda) == (calibration.threshold, calibration.lam)
    return {"saved": saved, "threshold": repr(float(calibration.threshold)), "lam": repr(float(calibration.lam))}


def _curve_subset(curve: Sequence) -> list:
    """The points nearest to each of `TRADEOFF_SPEEDUPS`, without repeats, in order of speed-up."""
    if not curve:
        return []
    nearest = {min(range(len(curve)), key=lambda i: abs(curve[i].speedup - target)) for target in TRADEOFF_SPEEDUPS}
    return sorted((curve[i] for i in nearest), key=lambda point: point.speedup)


def _row_values(row) -> dict:
    """One trade-off row as `{"setting", "threshold", "lam", "speedup", "accuracy", "metrics"}`."""
    metrics = dict(_get(row, "metrics") or {})
    if isinstance(row, Mapping):
        known = {"setting", "threshold", "lam", "speedup", "accuracy", "metrics"}
        metrics.update(
            {
                key: value
                for key, value in row.items()
                if key not in known and isinstance(value, numbers.Real) and not isinstance(value, bool)
            }
        )
    metrics.pop("accuracy", None)
    metrics.pop("speedup", None)
    return {
        "setting": _get(row, "setting"),
        "threshold": _get(row, "threshold"),
        "lam": _get(row, "lam"),
        "speedup": _get(row, "speedup"),
        "accuracy": _get(row, "accuracy"),
        "metrics": metrics,
    }


def _tradeoff_table(calibration, tradeoff_rows) -> dict | None:
    from_calibration = tradeoff_rows is None
    if from_calibration:
        rows = _curve_subset(calibration.curve) if calibration is not None else []
    else:
        rows = list(tradeoff_rows)  # the caller's choice and order
    if not rows:
        return None
    rows = [_row_values(row) for row in rows]
    extra = list(dict.fromkeys(name for row in rows for name in row["metrics"]))
    columns = [
        ("Setting", "setting", _cell),
        ("Threshold", "threshold", _setting),
        ("Lambda", "lam", _setting),
        ("Layer speed-up", "speedup", _speedup),
        ("Accuracy", "accuracy", _metric),
    ]
    columns = [column for column in columns if any(row[column[1]] is not None for row in rows)]
    header = [label for label, _, _ in columns] + [_metric_label(name) for name in extra]
    body = [
        [fmt(row[key]) if row[key] is not None else "-" for _, key, fmt in columns]
        + [_metric(row["metrics"][name]) if name in row["metrics"] else "-" for name in extra]
        for row in rows
    ]
    return {"header": header, "rows": body, "from_calibration": from_calibration}


def _split_eval_metrics(eval_metrics: Mapping) -> dict[str, dict[str, float]]:
    """`eval_metrics` in either accepted form as `{"full_model": {...}, "early_exit": {...}}`."""
    split = {setting: {} for setting in EVAL_SETTINGS}
    if any(isinstance(value, Mapping) for value in eval_metrics.values()):
        unknown = set(eval_metrics) - set(EVAL_SETTINGS)
        if unknown:
            raise ValueError(f"eval_metrics has unknown settings {sorted(unknown)}; use {list(EVAL_SETTINGS)}.")
        for setting, metrics in eval_metrics.items():
            for name, value in (metrics or {}).items():
                split[setting][name] = _number(value, f"eval_metrics[{setting!r}][{name!r}]")
        return split
    for key, value in eval_metrics.items():
        # `DE3Trainer.evaluate()` output as it is: split prefix off, bookkeeping and per-exit accuracies left out.
        key = re.sub(r"^(eval|test|predict)_", "", key)
        if key in _NOT_CARD_METRICS or re.fullmatch(r"exit_\d+_accuracy", key):
            continue
        if key.startswith("early_exit_"):
            setting, name = "early_exit", key.removeprefix("early_exit_")
        else:
            setting, name = "full_model", key.removeprefix("full_")
        split[setting][name] = _number(value, f"eval_metrics[{key!r}]")
    return split


def _early_exit_setting(config, calibration) -> dict:
    """The exit setting the early-exit results stand for: the calibrated one, else the saved defaults."""
    if calibration is not None:
        return {"threshold": calibration.threshold, "lam": calibration.lam, "source": "calibrated",
                "policy": getattr(calibration, "policy", "de3"), "parameters": getattr(calibration, "parameters", {})}
    policy = build_exit_policy(config)  # what `predict_early()` runs with the saved defaults
    return {"threshold": config.early_exit_threshold, "lam": config.early_exit_lambda, "source": "saved default",
            "policy": policy.name, "parameters": policy.parameters()}


def _describe_setting(early_exit: dict) -> str:
    """`threshold T, lambda L` for DE3; the policy and its parameters for another policy."""
    if early_exit.get("policy", "de3") == "de3":
        return f"threshold {_setting(early_exit['threshold'])}, lambda {_setting(early_exit['lam'])}"
    parameters = ", ".join(f"{name} {_setting(value)}" for name, value in early_exit["parameters"].items())
    return f"policy {early_exit['policy']}" + (f", {parameters}" if parameters else "")


def _early_exit_label(early_exit: dict, speedup: float | None) -> str:
    label = f"early exit, {_describe_setting(early_exit)}"
    return label if speedup is None else f"{label}, {_speedup(speedup)} layer speed-up"


def _eval_results(evaluation: dict, early_exit: dict, task_name: str, dataset_name: str) -> list[EvalResult]:
    speedup = evaluation["early_exit"].get("speedup")
    labels = {"full_model": "full model", "early_exit": _early_exit_label(early_exit, speedup)}
    return [
        EvalResult(
            task_type=TASK_TYPE,
            task_name=task_name,
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            metric_type=name,
            metric_name=f"{_metric_label(name)} ({labels[setting]})",
            metric_value=value,
        )
        for setting in EVAL_SETTINGS
        for name, value in evaluation[setting].items()
        if name != "speedup"  # a cost, not a quality metric: it goes into the metric names and the table
    ]


def _evaluation_table(config, evaluation: dict, early_exit: dict) -> dict | None:
    if not any(evaluation.values()):
        return None
    names = [
        name
        for name in dict.fromkeys(name for setting in EVAL_SETTINGS for name in evaluation[setting])
        if name != "speedup"
    ]
    early_speedup = evaluation["early_exit"].get("speedup")
    header = ["Setting"] + (["Layer speed-up"] if early_speedup is not None else []) + [
        _metric_label(name) for name in names
    ]
    rows = []
    for setting in EVAL_SETTINGS:
        metrics = evaluation[setting]
        if not metrics:
            continue
        if setting == "full_model":
            label, speedup = f"Full model (all {config.num_hidden_layers} layers)", 1.0  # eq. 12 with every exit at M
        else:
            label = f"Early exit ({_describe_setting(early_exit)})"
            speedup = early_speedup
        row = [label] + ([_speedup(speedup) if speedup is not None else "-"] if early_speedup is not None else [])
        rows.append(row + [_metric(metrics[name]) if name in metrics else "-" for name in names])
    early_exit_shown = bool(evaluation["early_exit"])
    return {"header": header, "rows": rows, "early_exit_source": early_exit["source"] if early_exit_shown else None}


__all__ = ["build_model_card", "write_model_card"]
