"""Shared pytest set-up.

Doctests print arrays with four fixed decimals, so the examples in the docstrings read like
the notes (``[0.0900 0.2447 0.6652]``) and do not depend on float32's last digits.
"""

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_print_options(request: pytest.FixtureRequest):
    if isinstance(request.node, pytest.DoctestItem):
        with np.printoptions(precision=4, floatmode="fixed", suppress=True):
            yield
    else:
        yield
