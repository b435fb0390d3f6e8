"""Metrics equal hand-computed values on small confusion matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from codemae_cli.tasks.metrics import (
    average_precision,
    classification_metrics,
    confusion_matrix,
    multilabel_metrics,
    segmentation_metrics,
)


def test_confusion_matrix_counts_and_ignore():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    cm = confusion_matrix(pred, target, 3, ignore_index=255)
    # rows = reference, columns = prediction; the 255 pixel is skipped
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    np.testing.assert_array_equal(cm, expected)


def test_confusion_matrix_torch_matches_numpy():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (2, 16, 16), generator=g)
    target[0, :3] = 255
    pred = torch.randint(0, 4, (2, 16, 16), generator=g)
    np.testing.assert_array_equal(confusion_matrix(pred, target, 4, 255),
                                  confusion_matrix(pred.numpy(), target.numpy(), 4, 255))


def test_segmentation_metrics_hand_computed():
    cm = np.array([[50, 10, 0],
                   [5, 35, 0],
                   [0, 0, 0]])  # class 2 absent from reference and prediction
    m = segmentation_metrics(cm, ["a", "b", "c"])
    iou_a = 50 / (60 + 55 - 50)
    iou_b = 35 / (40 + 45 - 35)
    assert m["iou"][0] == pytest.approx(iou_a)
    assert m["iou"][1] == pytest.approx(iou_b)
    assert math.isnan(m["iou"][2])
    assert m["miou"] == pytest.approx((iou_a + iou_b) / 2)
    assert m["f1"][0] == pytest.approx(2 * 50 / (60 + 55))
    assert m["precision"][1] == pytest.approx(35 / 45)
    assert m["recall"][1] == pytest.approx(35 / 40)
    assert m["oa"] == pytest.approx(85 / 100)
    pe = (60 * 55 + 40 * 45) / 100**2
    assert m["kappa"] == pytest.approx((0.85 - pe) / (1 - pe))
    assert m["support"] == [60, 40, 0]
    assert m["classes"] == ["a", "b", "c"]


def test_predicted_but_absent_class_counts_as_zero_iou():
    cm = np.array([[8, 2], [0, 0]])  # class 1 never in the reference but predicted twice
    m = segmentation_metrics(cm)
    assert m["iou"][1] == 0.0
    assert m["miou"] == pytest.approx((0.8 + 0.0) / 2)


def test_classification_metrics_top1():
    logits = np.array([[2.0, 0.1], [0.1, 3.0], [1.0, 0.0], [0.0, 1.0]])
    m = classification_metrics(logits, np.array([0, 1, 1, 1]), 2)
    assert m["top1"] == pytest.approx(0.75)
    assert m["confusion"] == [[1, 0], [1, 2]]


def test_average_precision_hand_computed():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    targets = np.array([1, 0, 1, 0])
    # precision at the two positives: 1/1 and 2/3
    assert average_precision(scores, targets) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(scores[::-1], targets[::-1]) == pytest.approx((1 + 2 / 3) / 2)


def test_multilabel_metrics():
    scores = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.8]])
    targets = np.array([[1, 0], [0, 1], [0, 1]])
    m = multilabel_metrics(scores, targets)
    assert m["ap"] == [pytest.approx(1.0), pytest.approx(1.0)]
    # micro: flatten -> scores sorted 0.9(1) 0.8(1) 0.7(1) 0.6(0) 0.2(0) 0.1(0): AP = 1
    assert m["micro_map"] == pytest.approx(1.0)
    # threshold 0.5: tp = 1 + 2, fp = 1 (0.6), fn = 0 -> micro F1 = 6 / 7
    assert m["micro_f1"] == pytest.approx(6 / 7)
