"""Data loading (GLUE TSVs, local files, VADER through pip) and the task metrics."""

import numpy as np
import pytest

from de3_transformers.data import load_glue_task, load_local_files, load_vader_movie_reviews
from de3_transformers.metrics import classification_metrics


@pytest.mark.parametrize(
    "task, train_rows, dev_rows, dev_first_class",
    [("rte", 2490, 277, 146), ("mrpc", 3668, 408, 129), ("cola", 8551, 1043, 322), ("sst2", 67349, 872, 428)],
)
def test_glue_tsvs_load_with_every_row_and_integer_labels(glue_dir, task, train_rows, dev_rows, dev_first_class):
    data = load_glue_task(task, glue_dir)
    assert (data["train"].num_rows, data["validation"].num_rows) == (train_rows, dev_rows)
    labels = np.array(data["validation"]["label"])
    assert set(labels) == {0, 1} and (labels == 0).sum() == dev_first_class  # counts from the data README


def test_pair_tasks_use_the_hub_column_names(glue_dir):
    assert {"sentence1", "sentence2", "label"} <= set(load_glue_task("mrpc", glue_dir)["train"].column_names)


def test_rte_text_keeps_its_quotes(glue_dir):
    # default csv quoting would silently change 73 RTE train rows; quoting=3 keeps the raw text
    texts = load_glue_task("rte", glue_dir)["train"]["sentence1"]
    assert sum('"' in text for text in texts) > 0


def test_unknown_task_and_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown GLUE task"):
        load_glue_task("squad", tmp_path)
    with pytest.raises(FileNotFoundError, match="RTE/"):
        load_glue_task("rte", tmp_path)


def test_local_tsv_and_json_files(tmp_path):
    (tmp_path / "train.tsv").write_text('sentence\tlabel\nit "works"\t1\nit does not\t0\n')
    data = load_local_files(tmp_path / "train.tsv")
    assert data["train"]["sentence"] == ['it "works"', "it does not"]
    (tmp_path / "dev.json").write_text('{"text": "fine", "label": 1}\n')
    with pytest.raises(ValueError, match="all be csv, tsv or json"):
        load_local_files(tmp_path / "train.tsv", tmp_path / "dev.json")


def test_vader_movie_reviews_come_through_pip_with_sign_labels(tmp_path):
    data = load_vader_movie_reviews(cache_dir=tmp_path)
    assert sum(split.num_rows for split in data.values()) == 10605 - 37  # neutral snippets dropped
    assert (tmp_path / "vader" / "movieReviewSnippets_GroundTruth.txt").exists()
    first = data["train"][0]
    assert set(first) == {"sentence", "label"} and first["label"] in (0, 1)
    assert data["train"].features["label"].names == ["negative", "positive"]


def test_metrics_against_hand_counts():
    compute = classification_metrics(("accuracy", "f1", "matthews_correlation"))
    values = compute(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    # tp=1, fp=1, tn=2, fn=0: accuracy 3/4, F1 = 2/3, MCC = (2 - 0) / sqrt(2 * 1 * 2 * 3) = 0.5774
    assert values["accuracy"] == 0.75
    assert values["f1"] == pytest.approx(2 / 3)
    assert values["matthews_correlation"] == pytest.approx(2 / np.sqrt(12))


def test_unknown_metric_is_rejected():
    with pytest.raises(ValueError, match="bleu"):
        classification_metrics(("bleu",))


def test_qqp_and_mnli_tsvs_with_glue_headers(tmp_path):
    (tmp_path / "QQP").mkdir(), (tmp_path / "MNLI").mkdir()
    qqp = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t1\t2\tHow do I?\tHow can I?\t1\n2\t3\t4\tWhy?\tWhen?\t0\n"
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "QQP" / name).write_text(qqp)
    header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
              "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
    rows = ["0\t1\t1e\tfiction\t(a)\t(b)\t(A)\t(B)\tA man sleeps.\tA person rests.\tentailment\tentailment\n",
            "1\t2\t2c\tfiction\t(a)\t(b)\t(A)\t(B)\tIt rains.\tIt is \"dry\".\tcontradiction\tcontradiction\n"]
    (tmp_path / "MNLI" / "train.tsv").write_text(header + "".join(rows))
    (tmp_path / "MNLI" / "dev_matched.tsv").write_text(header + rows[1])
    qqp_data = load_glue_task("qqp", tmp_path)
    assert qqp_data["train"]["label"] == [1, 0] and qqp_data["train"]["question2"] == ["How can I?", "When?"]
    mnli = load_glue_task("mnli", tmp_path)
    assert mnli["train"]["label"] == [0, 2] and mnli["validation"]["hypothesis"] == ['It is "dry".']
