"""optax's own shipped softmax cross-entropy tests, run against softmax_jax's functions.

Every case passes except the forward-mode half of ``test_gradient``
(``jax.test_util.check_grads`` in both modes): the losses are ``custom_vjp`` functions,
reverse mode only.
"""

from __future__ import annotations

import unittest

import pytest

import softmax_jax as sj

_CLASSES = {
    "softmax_cross_entropy": "SoftmaxCrossEntropyTest",
    "softmax_cross_entropy_with_integer_labels": "SoftmaxCrossEntropyWithIntegerLabelsTest",
    # softmax_jax's dense loss is also optax's safe one (a -inf logit gives a finite loss)
    "safe_softmax_cross_entropy": "SafeSoftmaxCrossEntropyTest",
}


def test_optax_classification_suite_passes_but_forward_mode(monkeypatch):
    classification = pytest.importorskip("optax.losses._classification")
    shipped = pytest.importorskip("optax.losses._classification_test")
    for name in _CLASSES:
        ours = "softmax_cross_entropy" if name.startswith("safe_") else name
        monkeypatch.setattr(classification, name, getattr(sj, ours))
    loader = unittest.TestLoader()
    suite = unittest.TestSuite(loader.loadTestsFromTestCase(getattr(shipped, c))
                               for c in _CLASSES.values())
    result = unittest.TestResult()
    suite.run(result)
    failed = sorted(t.id().rsplit(".", 2)[-2:][1] for t, _ in result.failures + result.errors)
    assert result.testsRun >= 25
    assert failed == ["test_gradient"] * 3, failed
