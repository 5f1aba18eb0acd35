"""Early exit on ONNX Runtime without torch: [`OnnxEarlyExitClassifier`] loads a folder written by
`de3_transformers.export_onnx` and classifies tokenized batches or texts (tokenized with `tokenizers`), each sample
leaving at its own exit.

The loop is the one of `predict_early` (docs/method.md section 6): run the embeddings, then exit by exit the graph of
the layers up to that exit, its head and its exit signals; the policy decides on the host which rows leave, and the
rows that stay are copied into a smaller batch for the next graph. The loop stops when no row is left: no graph
ever runs on an empty batch, which ONNX Runtime's reshapes reject.

What a graph passes to the next is per row and named by the graphs: an output `<name>_out` is the next graph's input
`<name>` (the hidden states and, under MPEE's token exit, the token mask and token importance of the pruned
sequence), and the logits are the next graph's `carried` ones (MPEE's classifier memory). The runner feeds each graph
the inputs it names and compacts all of them alike.

A batch of one text under the exported policy runs `one_text.onnx` instead (`de3_transformers.onnx_one_text`): the
same graphs joined by ONNX `If`s, with the policy's rule inside, so the text leaves in one `run`, without the cost of a
`run` per exit that dominates at batch 1.
"""

import json
import math
import numbers
from pathlib import Path

import numpy as np


try:
    import onnxruntime as ort
except ImportError as error:  # an optional dependency of de3-transformers
    raise ImportError('de3_onnx needs onnxruntime, which is not installed: pip install "de3-transformers[onnx]"') \
        from error

from .checks import DEFAULT_MAX_LAMBDA, check_inputs, check_policy_parameters
from .export_files import check_export, check_graph, check_num_labels
from .policies import POLICY_NAMES, Policy


ONNX_CONFIG_NAME = "de3_onnx.json"
_NOT_FINITE = ("The logits of samples {samples} are not finite (NaN or inf): the exported weights hold NaN or inf. "
               "Check the model with predict_early before exporting it.")


def session_options(threads: int | None) -> ort.SessionOptions:
    """One graph runs after another, so a session's threads must not spin waiting for work when its graph is done:
    with spinning on, the seven sessions of the MiniLM on 2 cores took 5.4 s for 200 texts at batch 1, against 1.0 s
    with it off (measured while choosing the design; the plain one-graph model took 0.84 s)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def _number(value, cast, default):
    """`cast(value)` for a finite number, else `default` (for a parameter the policy does not read)."""
    return cast(value) if isinstance(value, numbers.Real) and math.isfinite(value) else default


class OnnxEarlyExitClassifier:
    """A DE3 model exported with `export_onnx`, served on ONNX Runtime with per-sample early exit.

    Args:
        folder: the folder `export_onnx` wrote.
        threads: intra-op threads per graph (default: ONNX Runtime's, one per core).
        providers: ONNX Runtime execution providers (default: CPU).

    Raises:
        FileNotFoundError: when `folder` holds no export.
        ValueError (`de3_onnx.export_files.ExportMismatchError`): when its files do not belong together (as
            `check_export`: edited `exit_layers` or `num_labels`, a graph missing, changed or of another export).
    """

    def __init__(self, folder, threads: int | None = None, providers: list[str] | None = None):
        folder = Path(folder)
        if not (folder / ONNX_CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{folder} holds no {ONNX_CONFIG_NAME}: write it with de3_transformers.export_onnx.")
        self.folder = folder
        self.config = json.loads((folder / ONNX_CONFIG_NAME).read_text())
        model_config_path = folder / "config.json"
        model_config = json.loads(model_config_path.read_text()) if model_config_path.is_file() else {}
        check_export(folder, self.config, ONNX_CONFIG_NAME, model_config)
        self.id2label = {int(index): name for index, name in self.config["id2label"].items()}
        options, providers = session_options(threads), providers or ["CPUExecutionProvider"]
        self.embeddings = self._session(folder / "embeddings.onnx", options, providers)
        self.exits = [self._session(folder / f"exit_{index}.onnx", options, providers)
                      for index in range(len(self.config["exit_layers"]))]
        check_num_labels(self.exits[-1], folder / f"exit_{len(self.exits) - 1}.onnx", self.config)
        self.limits = self._limits(model_config)
        self.input_names = [[tensor.name for tensor in session.get_inputs()] for session in self.exits]
        self.output_names = [[tensor.name for tensor in session.get_outputs()] for session in self.exits]
        self._tokenizer, self._one_text, self._session_args = None, None, (threads, providers)

    @property
    def one_text(self) -> ort.InferenceSession | None:
        """The session of the one-text graph (`one_text.onnx`: the whole early-exit forward of one text in one
        `run`), loaded on the first batch of one; `None` when the export has none."""
        name = self.config.get("one_text_graph")
        if self._one_text is None and name:
            threads, providers = self._session_args
            # One graph, run back to back: its threads may spin between runs, as in the plain model's session.
            options = ort.SessionOptions()
            if threads is not None:
                options.intra_op_num_threads = threads
            self._one_text = self._session(self.folder / name, options, providers or ["CPUExecutionProvider"])
        return self._one_text

    def _session(self, path: Path, options, providers) -> ort.InferenceSession:
        session = ort.InferenceSession(str(path), options, providers=providers)
        check_graph(session, path, self.config)
        return session

    def _limits(self, model_config: dict) -> dict:
        """What the input checks read: the sizes from the settings, or for an export written before they were
        recorded there, from its `config.json` (`model_config`; not checked when neither has them)."""
        config = self.config
        return {"max_sequence_length": config["max_sequence_length"],
                **{key: config.get(key, model_config.get(key)) for key in ("vocab_size", "type_vocab_size")}}

    @property
    def tokenizer(self):
        """The fast tokenizer saved with the export (`tokenizer.json`, read with `tokenizers`; loaded on first use).

        Raises:
            FileNotFoundError: when the export was written without its tokenizer.
        """
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.folder / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: export with export_onnx(model, folder, tokenizer=...) to "
                                        "classify texts, or pass token ids to predict().")
            self._tokenizer = Tokenizer.from_file(str(path))
            pad_id = self.config["pad_token_id"] or 0
            self._tokenizer.enable_padding(pad_id=pad_id, pad_token=self._tokenizer.id_to_token(pad_id))
        return self._tokenizer

    def tokenize(self, texts: list[str], text_pairs: list[str] | None = None, max_length: int | None = None) -> dict:
        """`{"input_ids", "attention_mask", "token_type_ids"}` `[B, L]` int64 arrays, padded to the longest text and
        truncated to `max_length` (default: the position embeddings' length), as the model's own tokenizer gives."""
        tokenizer = self.tokenizer
        tokenizer.enable_truncation(max_length or self.config["max_sequence_length"])
        encodings = tokenizer.encode_batch(texts if text_pairs is None else list(zip(texts, text_pairs)))
        return {name: np.array([getattr(encoding, field) for encoding in encodings], dtype=np.int64)
                for name, field in (("input_ids", "ids"), ("attention_mask", "attention_mask"),
                                    ("token_type_ids", "type_ids"))}

    def build_policy(self, policy: str | None = None, threshold: float | None = None, lam: float | None = None,
                     patience: int | None = None) -> Policy:
        """The exit policy, its parameters defaulting to the exported (calibrated) ones, as `build_exit_policy`.

        Raises:
            ValueError: for an unknown policy, a threshold of another policy missing, a parameter the policy reads
                out of its range as `predict_early` checks it (`checks.check_policy_parameters`: not a finite number
                or a bool, a negative threshold of a policy whose signal is at least 0, lam above the export's
                `max_lambda`, a patience that is not an integer >= 0, >= 1 for patient_confident), or prototypes the
                policy reads that were never set.
        """
        config = self.config
        name = policy or config["early_exit_policy"]
        if name not in POLICY_NAMES:
            raise ValueError(f"policy={name!r} does not run on ONNX Runtime; choose one of {', '.join(POLICY_NAMES)}.")
        if threshold is None:
            if name != config["early_exit_policy"] and name != "patience":
                raise ValueError(f"policy={name!r} is not the exported one ({config['early_exit_policy']!r}): pass its "
                                 "threshold.")
            threshold = config["early_exit_threshold"]
        parameters = {"threshold": threshold, "lam": config["early_exit_lambda"] if lam is None else lam,
                      "patience": config["early_exit_patience"] if patience is None else patience}
        check_policy_parameters(name, parameters, config.get("max_lambda", DEFAULT_MAX_LAMBDA))
        # A parameter the policy does not read is ignored (unchecked), as `get_exit_policy` ignores it.
        built = Policy(name, _number(parameters["threshold"], float, 0.0), _number(parameters["lam"], float, 1.0),
                       _number(parameters["patience"], int, 2))
        if built.needs_distance_ratio and not config["prototypes_initialized"]:
            raise ValueError("This model's prototypes were never set, so the distance ratio is unknown: train it, or "
                             "use lam=0 (entropy alone).")
        if built.needs_scores and not config["learning_to_exit"]:
            raise ValueError(
                "policy='learned' needs learning-to-exit heads: train the model with learning_to_exit=True.")
        return built

    def predict(self, input_ids, attention_mask=None, token_type_ids=None, policy: str | None = None,
                threshold: float | None = None, lam: float | None = None, patience: int | None = None) -> dict:
        """Classifies a tokenized batch (numpy arrays `[B, L]`) with early exit.

        Returns:
            `{"logits": [B, K] float32, "exit_layers": [B] int64 (encoder layer 1..M each sample left at),
            "speedup": layer speed-up M * B / sum(exit_layers)}`.

        Raises:
            ValueError: as [`build_policy`], and as `checks.check_inputs` (as `predict_early`): inputs empty or of
                another shape than `[B, L]`, longer than the position embeddings, a mask or token types of another
                shape, a mask of values other than 0/1, with a row attending to nothing or starting with padding, ids
                out of the vocabulary or token types out of the type vocabulary.
            TypeError: for ids that are not int64 / int32 (float ids, for instance).
            FloatingPointError: when a sample's answer is not finite.
        """
        rule = self.build_policy(policy, threshold, lam, patience)
        input_ids, mask, types = self._inputs(input_ids, attention_mask, token_type_ids)
        size, config = input_ids.shape[0], self.config
        if size == 1 and rule.name == self.config.get("one_text_policy") and self.one_text is not None:
            return self._predict_one(input_ids, mask, types, rule)
        hidden = self.embeddings.run(None, {"input_ids": input_ids, "token_type_ids": types})[0]
        rows = np.arange(size)  # the sample of each running row
        running = {"hidden": hidden, "attention_mask": mask}  # what the next graph reads, one row per running row
        out_logits = np.zeros((size, config["num_labels"]), dtype=np.float32)
        out_layers = np.full(size, config["num_hidden_layers"], dtype=np.int64)
        state, top = rule.start(size), len(self.exits) - 1
        for index, layer in enumerate(config["exit_layers"]):
            signals = self._step(index, running)
            logits = signals["logits"]
            if index == top:
                out_logits[rows], out_layers[rows] = logits, layer
                break
            leave, state = rule.leave(signals, state)
            if leave.any():
                out_logits[rows[leave]], out_layers[rows[leave]] = logits[leave], layer
                stay = ~leave
                if not stay.any():
                    break
                rows, state = rows[stay], tuple(part[stay] for part in state)
                running = {name: value[stay] for name, value in running.items()}
        not_finite = ~np.isfinite(out_logits.sum(axis=-1))
        if not_finite.any():
            raise FloatingPointError(_NOT_FINITE.format(samples=np.flatnonzero(not_finite)[:8].tolist()))
        return {"logits": out_logits, "exit_layers": out_layers,
                "speedup": config["num_hidden_layers"] * size / int(out_layers.sum())}

    def exit_outputs(self, input_ids, attention_mask=None, token_type_ids=None) -> dict:
        """Every exit's logits and exit signals for a tokenized batch, at full depth (what calibration reads),
        batch-first as the model's forward gives them with `output_exit_signals=True`.

        Returns:
            `{"exit_logits": [B, E, K], "entropy": [B, E-1], "distance_ratio": [B, E-1] or None (prototypes not set),
            "exit_scores": [B, E-1] or None (no learning-to-exit heads)}`, float32.

        Raises:
            ValueError: as [`predict`] for the inputs.
        """
        input_ids, mask, types = self._inputs(input_ids, attention_mask, token_type_ids)
        running = {"hidden": self.embeddings.run(None, {"input_ids": input_ids, "token_type_ids": types})[0],
                   "attention_mask": mask}
        logits, signals = [], {"entropy": [], "distance_ratio": [], "scores": []}
        for index in range(len(self.exits)):
            outputs = self._step(index, running)
            logits.append(outputs["logits"])
            if index < len(self.exits) - 1:
                for name, values in signals.items():
                    values.append(outputs.get(name))

        def stacked(values):
            if any(value is None for value in values):
                return None
            return np.stack(values, axis=1) if values else np.zeros((len(input_ids), 0), dtype=np.float32)

        return {"exit_logits": np.stack(logits, axis=1), "entropy": stacked(signals["entropy"]),
                "distance_ratio": stacked(signals["distance_ratio"]), "exit_scores": stacked(signals["scores"])}

    def save_policy(self, policy: str, threshold: float | None = None, lam: float | None = None,
                    patience: int | None = None) -> None:
        """Makes `policy` and its parameters (those given) the defaults of this runner and of its folder's settings, as
        calibration does for a model's config.

        Raises:
            ValueError: as [`build_policy`].
        """
        updates = {"early_exit_policy": policy, "early_exit_threshold": threshold, "early_exit_lambda": lam,
                   "early_exit_patience": patience}
        settings = {**self.config, **{key: value for key, value in updates.items() if value is not None}}
        previous, self.config = self.config, settings
        try:
            self.build_policy()
        except ValueError:
            self.config = previous
            raise
        (self.folder / ONNX_CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")

    def _inputs(self, input_ids, attention_mask, token_type_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return check_inputs(input_ids, attention_mask, token_type_ids, **self.limits)

    def _step(self, index: int, running: dict) -> dict:
        """Runs exit graph `index` on the running rows, puts what the next graph reads into `running` (each
        `<name>_out`, and the logits as `carried`, MPEE's classifier memory) and returns the exit's logits and
        signals."""
        session = self.exits[index]
        outputs = dict(zip(self.output_names[index],
                           session.run(None, {name: running[name] for name in self.input_names[index]})))
        for name in [name for name in outputs if name.endswith("_out")]:
            running[name.removesuffix("_out")] = outputs.pop(name)
        running["carried"] = outputs["logits"]
        return outputs

    def _predict_one(self, input_ids, mask, types, rule: Policy) -> dict:
        feeds = {"input_ids": input_ids, "token_type_ids": types, "attention_mask": mask,
                 "threshold": np.array(rule.threshold, dtype=np.float32),
                 "lam": np.array(rule.lam, dtype=np.float32),
                 # float32(lam + 1) rounded once from float64, as the host's rule (policies.hybrid_indicator) has it
                 "lam_plus_one": np.array(rule.lam + 1.0, dtype=np.float32),
                 "patience": np.array(rule.patience, dtype=np.int64)}
        logits, layers = self.one_text.run(None, feeds)
        if not np.isfinite(logits).all():
            raise FloatingPointError(_NOT_FINITE.format(samples=[0]))
        return {"logits": logits, "exit_layers": layers, "speedup": self.config["num_hidden_layers"] / int(layers[0])}

    def __call__(self, texts, text_pairs=None, batch_size: int = 32, max_length: int | None = None, **exit_options):
        """Classifies texts (or text pairs) with early exit, in batches of texts of similar length; results in input
        order.

        Returns:
            A list of `{"label", "score" (softmax probability of the label), "exit_layer"}`, one per text.

        Raises:
            TypeError: for a text or pair that is not a string (`None`, for instance), or a `batch_size` that is not
                an integer.
            ValueError: for `batch_size` below 1, a count of pairs other than of texts, and as [`predict`].
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            error = ValueError if isinstance(batch_size, numbers.Integral) else TypeError
            raise error(f"batch_size={batch_size!r}: give an integer of at least 1 (texts classified per batch).")
        texts = [texts] if isinstance(texts, str) else list(texts)
        pairs = None if text_pairs is None else ([text_pairs] if isinstance(text_pairs, str) else list(text_pairs))
        for name, values in (("texts", texts), ("text_pairs", pairs or [])):
            wrong = [index for index, value in enumerate(values) if not isinstance(value, str)]
            if wrong:
                raise TypeError(f"{name}[{wrong[0]}] is {values[wrong[0]]!r}, not a string: give a string for every "
                                "text and pair (drop or fill the missing ones).")
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"Got {len(pairs)} text_pairs for {len(texts)} texts: give one pair per text.")
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        results = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            encoded = self.tokenize([texts[i] for i in chunk], None if pairs is None else [pairs[i] for i in chunk],
                                    max_length)
            out = self.predict(**encoded, **exit_options)
            probabilities = np.exp(out["logits"] - out["logits"].max(axis=-1, keepdims=True))
            probabilities /= probabilities.sum(axis=-1, keepdims=True)
            for row, index in enumerate(chunk):
                label = int(probabilities[row].argmax())
                results[index] = {"label": self.id2label[label], "score": float(probabilities[row, label]),
                                  "exit_layer": int(out["exit_layers"][row])}
        return results


__all__ = ["OnnxEarlyExitClassifier", "session_options"]
