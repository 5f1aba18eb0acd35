"""Checks, at load, that the files of an export folder belong together (no torch): `export_onnx` writes the graphs and
tokenizer files first and `de3_onnx.json` last, with a manifest (`export_id`, a random id also written into every
graph's metadata, and `files`, the size of each file it wrote), so that a folder exported again with another model and
interrupted half way, a graph copied from another export, or an edited `exit_layers` fails at load with an error that
says to export again, instead of mixing the answers of two models.

What the manifest detects: a missing file, a file whose size changed, a graph of another export (its id), graphs that
disagree with `exit_layers`, `num_hidden_layers` or `num_labels`. What it does not: a graph or tokenizer file edited
in place to the same size. The graphs are not hashed at load: on the MiniLM export (188 MB of graphs, 2 cores) sha256
of the seven graphs loaded at init took about 0.5 s against 0.73 s for loading them (1.0 s for every file), while the
size and id checks take well under 1 ms.
"""

import re
from pathlib import Path


EXPORT_ID_KEY = "de3_export_id"  # the graphs' metadata key, as `de3_transformers.onnx_export` writes it
_EXPORT_AGAIN = "export the model again with de3_transformers.export_onnx"


class ExportMismatchError(ValueError):
    """The files of an export folder do not belong together (a `ValueError`)."""


def exit_graph_count(folder: Path) -> int:
    """How many exit graphs `exit_0.onnx`, `exit_1.onnx`, ... the folder holds.

    Raises:
        ExportMismatchError: when their numbers have a gap (a graph is missing).
    """
    numbers = sorted(int(match.group(1)) for path in folder.glob("exit_*.onnx")
                     if (match := re.fullmatch(r"exit_(\d+)\.onnx", path.name)))
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
        raise ExportMismatchError(f"{folder} lacks exit_{missing[0]}.onnx among its exit graphs: {_EXPORT_AGAIN}.")
    return len(numbers)


def check_export(folder: Path, settings: dict, settings_name: str, model_config: dict) -> None:
    """Checks that the settings (`settings_name`, read into `settings`) agree with the graph files present, with the
    model's `config.json` (read into `model_config`; empty where the folder has none) and with the manifest.

    Raises:
        ExportMismatchError: for `exit_layers` that are not increasing layers ending at `num_hidden_layers`, or whose
            count is not that of the exit graphs, settings that disagree with `config.json`, or a file of the
            manifest missing or of another size.
    """
    layers, depth = settings["exit_layers"], settings["num_hidden_layers"]
    count = exit_graph_count(folder)
    if (not layers or any(not isinstance(layer, int) or isinstance(layer, bool) for layer in layers)
            or layers != sorted(set(layers)) or layers[0] < 1 or layers[-1] != depth):
        raise ExportMismatchError(f"{folder / settings_name} has exit_layers={layers}: they must be increasing layers "
                                  f"from 1 ending at num_hidden_layers={depth}. Do not edit them: {_EXPORT_AGAIN}.")
    if len(layers) != count:
        raise ExportMismatchError(f"{folder / settings_name} has exit_layers={layers} ({len(layers)} exits) but the "
                                  f"folder holds {count} exit graphs (exit_0.onnx ...): the graphs were exported for "
                                  f"other exits; {_EXPORT_AGAIN}.")
    for key in ("exit_layers", "num_hidden_layers", "num_labels"):
        if key in model_config and model_config[key] != settings.get(key):
            raise ExportMismatchError(f"{folder / settings_name} has {key}={settings.get(key)!r} but config.json "
                                      f"has {model_config[key]!r}: one of them was edited; {_EXPORT_AGAIN}.")
    for name, size in settings.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise ExportMismatchError(f"{path} is missing (listed in {settings_name}): the export was interrupted or "
                                      f"the folder copied in part; {_EXPORT_AGAIN}.")
        if path.stat().st_size != size:
            raise ExportMismatchError(f"{path} has {path.stat().st_size} bytes, not the {size} {settings_name} lists: "
                                      f"it belongs to another export; {_EXPORT_AGAIN}.")


def check_graph(session, path: Path, settings: dict) -> None:
    """Checks that a loaded graph was written by the export of `settings` (the id in its metadata); exports written
    before the manifest carry no id and are not checked.

    Raises:
        ExportMismatchError: for a graph of another export.
    """
    expected = settings.get("export_id")
    if expected is None:
        return
    found = session.get_modelmeta().custom_metadata_map.get(EXPORT_ID_KEY)
    if found != expected:
        raise ExportMismatchError(f"{path} belongs to another export (export id {found!r}, the settings' is "
                                  f"{expected!r}): a re-export was interrupted or files were copied in; "
                                  f"{_EXPORT_AGAIN}.")


def check_num_labels(session, path: Path, settings: dict) -> None:
    """Checks that the top exit graph gives as many logits as the settings have labels (`num_labels`, `id2label`).

    Raises:
        ExportMismatchError: when they disagree.
    """
    width = session.get_outputs()[0].shape[-1]
    labels, names = settings["num_labels"], settings.get("id2label", {})
    if isinstance(width, int) and (labels != width or len(names) != width):
        raise ExportMismatchError(f"The settings have num_labels={labels} and {len(names)} label names but {path} "
                                  f"gives {width} logits: do not edit them; {_EXPORT_AGAIN}.")


__all__ = ["EXPORT_ID_KEY", "ExportMismatchError", "check_export", "check_graph", "check_num_labels",
           "exit_graph_count"]
