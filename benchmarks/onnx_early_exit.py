#!/usr/bin/env python
"""Benchmark (not a test): early exit on ONNX Runtime against the plain model on ONNX Runtime, side by side in one
run. (Not named onnxruntime.py: run as a script, that name would shadow the package.)

On the real MiniLM (a saved DE3 model, by default the main job's `outputs/quickstart`), for SST-2 dev sentences as
they are and padded to 128 tokens, at each batch size: the plain `BertForSequenceClassification` in eager PyTorch
and exported to ONNX Runtime (the reference), DE3 `predict_early` in eager PyTorch, and DE3 exported with
`export_onnx` and run by `de3_onnx` at threshold 0 (every layer) and at the thresholds calibrated for 1.5x, 2x and 3x
layers (on 500 SST-2 training sentences); at batch 1 (the one-text graph) also the chain of exit graphs it replaces.
Every run uses the same number of threads. Inputs are tokenized before the clock starts.

    python benchmarks/onnx_early_exit.py [--model_dir outputs/quickstart] [--num_texts 300] [--threads 2]

Writes a markdown report (command, hardware, tables) to benchmarks/results/onnxruntime_cpu.md.
"""

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import de3_transformers
from de3_onnx import OnnxEarlyExitClassifier
from de3_transformers import calibrate, export_onnx
from de3_transformers.benchmarking import hardware, plain_model, write_report
from de3_transformers.data import load_glue_task


def export_plain(plain, path: Path) -> Path:
    plain.set_attn_implementation("eager")  # as export_onnx: the SDPA mask path does not trace with a dynamic batch
    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = {name: torch.ones(2, 8, dtype=torch.long) for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(plain, tuple(example[name] for name in names), str(path), input_names=names,
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in names},
                                        "logits": {0: "batch"}})
    plain.set_attn_implementation("sdpa")
    return path


def timed(runs: list, repeats: int) -> list[tuple[float, int]]:
    """`(fastest seconds, layers run)` of each `(run, batches)` in `runs`, where `run(batch)` returns the layers it ran
    (summed over the batch's texts). After a warm-up, the runs take turns pass by pass: on this shared 2-core machine
    a pass can be slowed by 30% or more by other work, and taking turns spreads a slow spell over all runs instead of
    one; the fastest pass is the closest to what the code costs."""
    for run, batches in runs:
        for batch in batches[:3]:
            run(batch)
    fastest, layers = [float("inf")] * len(runs), [0] * len(runs)
    for _ in range(repeats):
        for index, (run, batches) in enumerate(runs):
            started, total = time.perf_counter(), 0
            for batch in batches:
                total += run(batch)
            fastest[index], layers[index] = min(fastest[index], time.perf_counter() - started), total
    return list(zip(fastest, layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default="outputs/quickstart")
    parser.add_argument("--glue_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
    parser.add_argument("--num_texts", type=int, default=300)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="passes per run; the fastest is reported")
    parser.add_argument("--out", default="benchmarks/results/onnxruntime_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    sst2 = load_glue_task("sst2", args.glue_dir)
    texts = sst2["validation"]["sentence"][: args.num_texts]
    held_out = [dict(tokenizer(row["sentence"]), label=row["label"]) for row in sst2["train"].select(range(500))]
    thresholds = {"threshold 0": 0.0}
    for target in (1.5, 2.0, 3.0):
        thresholds[f"calibrated {target:g}x"] = calibrate(model, held_out, target_speedup=target, save=False).threshold
    lam, num_layers = model.config.early_exit_lambda, model.config.num_hidden_layers

    work = Path(tempfile.mkdtemp(prefix="de3-onnx-bench-"))
    export_onnx(model, work / "de3")
    runner = OnnxEarlyExitClassifier(work / "de3", threads=args.threads)
    # Batches of one run the one-text graph; this export has none, so they run the chain of exit graphs instead.
    chain = OnnxEarlyExitClassifier(export_onnx(model, work / "chain", one_text_graph=False), threads=args.threads)
    plain = plain_model(model)
    reference_options = ort.SessionOptions()  # ONNX Runtime's defaults, as `optimum` users get them
    reference_options.intra_op_num_threads = args.threads
    reference = ort.InferenceSession(str(export_plain(plain, work / "plain.onnx")), reference_options,
                                     providers=["CPUExecutionProvider"])

    sections = []
    for inputs in ("SST-2 sentences", "128 tokens"):
        rows = ["| batch | run | layer speed-up | seconds | texts/s | wall-clock vs plain ORT | wall / layer |",
                "|---|---|---|---|---|---|---|"]
        for batch_size in args.batch_sizes:
            padding = {"padding": "max_length", "max_length": 128, "truncation": True} if inputs == "128 tokens" \
                else {"padding": True}
            batches = [tokenizer(texts[start : start + batch_size], return_tensors="pt", **padding)
                       for start in range(0, len(texts), batch_size)]
            arrays = [{name: tensor.numpy() for name, tensor in batch.items()} for batch in batches]
            def plain_eager(batch):
                plain(**batch)
                return num_layers * len(batch["input_ids"])

            def plain_onnx(batch):
                reference.run(None, batch)
                return num_layers * len(batch["input_ids"])

            runs = [("plain, PyTorch eager", plain_eager, batches),
                    ("plain, ONNX Runtime (reference)", plain_onnx, arrays)]
            for label, threshold in thresholds.items():
                if label in ("threshold 0", "calibrated 2x"):
                    runs.append((f"DE3 {label}, PyTorch eager", lambda batch, threshold=threshold: int(
                        model.predict_early(**batch, threshold=threshold, lam=lam).sample_exit_layers.sum()), batches))
                served = {"": runner}
                if batch_size == 1 and label in ("threshold 0", "calibrated 2x"):
                    served[" (chain of exit graphs)"] = chain
                for suffix, classifier in served.items():
                    runs.append((f"DE3 {label}, ONNX Runtime{suffix}",
                                 lambda batch, threshold=threshold, classifier=classifier: int(classifier.predict(
                                     **batch, threshold=threshold, lam=lam)["exit_layers"].sum()), arrays))
            with torch.inference_mode():
                measured = timed([(run, data) for _, run, data in runs], args.repeats)
            results = [(name, num_layers * len(texts) / layers, seconds)
                       for (name, _, _), (seconds, layers) in zip(runs, measured)]
            reference_seconds = results[1][2]
            for name, layer_speedup, seconds in results:
                wall = reference_seconds / seconds
                rows.append(f"| {batch_size} | {name} | {layer_speedup:.2f}x | {seconds:.3f} | "
                            f"{len(texts) / seconds:.0f} | {wall:.2f}x | {wall / layer_speedup:.2f} |")
                print(rows[-1], flush=True)
        sections.append(f"### {inputs}\n\n" + "\n".join(rows))

    report = "\n\n".join([
        "# Early exit on ONNX Runtime against the plain model on ONNX Runtime (CPU)",
        f"Command: `python {shlex.join(sys.argv)}`  \nHardware: {hardware('cpu')}; {args.threads} threads for every "
        f"run (torch and ONNX Runtime); torch {torch.__version__}, transformers {transformers.__version__}, "
        f"onnxruntime {ort.__version__}, de3-transformers {de3_transformers.__version__}, Python "
        f"{platform.python_version()}.  \nModel: `{args.model_dir}` ({num_layers} layers, exits after "
        f"{model.config.exit_layers}), lambda {lam:g}; thresholds calibrated on 500 SST-2 training sentences: "
        + ", ".join(f"{label} {value:.4f}" for label, value in thresholds.items() if value) + f". Texts: the first "
        f"{len(texts)} SST-2 dev sentences, tokenized before timing; seconds are the fastest of {args.repeats} passes, "
        "the runs of a batch size taking turns pass by pass. "
        "`wall / layer` is the share of the layer speed-up that shows in seconds against plain ONNX Runtime.",
        *sections,
    ])
    write_report(report, args.out)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
