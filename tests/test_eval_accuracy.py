"""Top-1 accuracy of QA / classification logits, against counts worked out by hand."""

import pytest
import torch

from lfvila_model.eval.run import accuracy, predict_logits
from tests.helpers import tiny_model


def test_accuracy_hand_made_logits():
    logits = torch.tensor([[0.1, 2.0, -1.0],   # argmax 1, label 1: right
                           [3.0, 1.0, 0.0],    # argmax 0, label 2: wrong
                           [0.0, 0.0, 5.0],    # argmax 2, label 2: right
                           [1.0, 1.0, 0.0]])   # tie between 0 and 1 -> 0 (first maximum), label 1: wrong
    m = accuracy(logits, torch.tensor([1, 2, 2, 1]))
    assert m == {"accuracy": 50.0, "num_correct": 2, "num_examples": 4}
    # multiple choice: logits over K = 4 candidates, one row per question
    m = accuracy(torch.tensor([[0.0, 0.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.1]]),
                 torch.tensor([2, 0, 3]))
    assert m["num_correct"] == 2 and m["accuracy"] == pytest.approx(200 / 3)
    assert accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))["accuracy"] == 0.0


def test_accuracy_argument_checks():
    with pytest.raises(ValueError, match=r"logits must be \(N, C\), got shape \(3,\)"):
        accuracy(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be \(N,\) = \(2,\) to match logits, got \(3,\)"):
        accuracy(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\), got min 0, max 4"):
        accuracy(torch.zeros(2, 4), torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="labels must be integer class ids"):
        accuracy(torch.zeros(2, 4), torch.tensor([0.0, 1.0]))


def test_predict_logits_refuses_a_retrieval_model():
    with pytest.raises(TypeError, match="accuracy evaluation needs an LFVILAQAMultichoice.*got LFVILARetrieval"):
        predict_logits(tiny_model(model_type="retrieval"), [])
