"""Validation metrics against a confusion example worked out by hand."""

from __future__ import annotations

import pytest
import torch

from bitcore.train.metrics import classification_metrics, predict_batches

CLASSES = ["cat", "dog", "owl"]
# 10 examples. true cat: 3 -> cat, 1 -> dog; true dog: 2 -> dog, 1 -> owl; true owl: 3 -> owl.
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PREDS = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_hand_made_confusion_example() -> None:
    m = classification_metrics(LABELS, PREDS, CLASSES)
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [0, 0, 3]]
    assert m["accuracy"] == 0.8 and m["num_examples"] == 10
    cat, dog, owl = m["per_class"]
    assert cat == {"label": "cat", "precision": 1.0, "recall": 0.75, "f1": 6 / 7, "support": 4}
    assert dog["label"] == "dog" and dog["support"] == 3
    assert dog["precision"] == pytest.approx(2 / 3, abs=1e-15)
    assert dog["recall"] == pytest.approx(2 / 3, abs=1e-15)
    assert dog["f1"] == pytest.approx(2 / 3, abs=1e-15)
    assert owl["precision"] == 0.75 and owl["recall"] == 1.0 and owl["support"] == 3
    assert owl["f1"] == pytest.approx(6 / 7, abs=1e-15)
    assert m["macro_f1"] == pytest.approx((6 / 7 + 2 / 3 + 6 / 7) / 3, abs=1e-15)


def test_agrees_with_scikit_learn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (200,), generator=gen)
    p = torch.where(
        torch.rand(200, generator=gen) < 0.6, y, torch.randint(0, 5, (200,), generator=gen)
    )
    p[p == 4] = 3  # class 4 is never predicted: precision 0/0 -> 0 as zero_division=0
    m = classification_metrics(y, p, list("abcde"))
    prec, rec, f1, sup = sklearn_metrics.precision_recall_fscore_support(
        y.numpy(), p.numpy(), labels=range(5), zero_division=0
    )
    assert [c["precision"] for c in m["per_class"]] == pytest.approx(prec.tolist(), abs=1e-12)
    assert [c["recall"] for c in m["per_class"]] == pytest.approx(rec.tolist(), abs=1e-12)
    assert [c["f1"] for c in m["per_class"]] == pytest.approx(f1.tolist(), abs=1e-12)
    assert [c["support"] for c in m["per_class"]] == sup.tolist()
    assert m["confusion_matrix"] == sklearn_metrics.confusion_matrix(y, p, labels=range(5)).tolist()
    assert m["per_class"][4]["precision"] == 0.0


def test_absent_class_and_empty_input() -> None:
    m = classification_metrics([0, 0], [0, 1], ["a", "b", "c"])
    assert m["per_class"][2] == {
        "label": "c",
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
    }
    empty = classification_metrics([], [], ["a", "b"])
    assert empty["accuracy"] is None and empty["confusion_matrix"] == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="differ"):
        classification_metrics([0, 1], [0], ["a", "b"])


def test_predict_batches_runs_eval_mode_and_restores_train_mode() -> None:
    linear = torch.nn.Linear(4, 2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.9), linear)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        linear.bias.zero_()
    x = torch.tensor([[2.0, 1, 0, 0], [0, 3, 0, 0], [1, 0, 0, 0]])
    batches = [(x[:2], torch.tensor([0, 0])), (x[2:], torch.tensor([0]))]
    model.train()
    labels, preds, loss = predict_batches(model, batches, torch.device("cpu"))
    assert model.training  # restored
    assert labels.tolist() == [0, 0, 0] and preds.tolist() == [0, 1, 0]  # no dropout applied
    logits = x[:, :2]
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    assert loss == pytest.approx(float(expected), abs=1e-6)
