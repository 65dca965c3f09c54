"""Shared fixtures: tiny models so the suite stays fast on 2 cores."""

from __future__ import annotations

import pytest
import torch

from forecaster.model import Forecaster, ModelConfig

torch.set_num_threads(1)


@pytest.fixture
def tiny_model() -> Forecaster:
    torch.manual_seed(0)
    return Forecaster(ModelConfig("rnn", 8, 1)).eval()


@pytest.fixture(params=["rnn", "gru", "lstm"])
def any_cell_model(request: pytest.FixtureRequest) -> Forecaster:
    torch.manual_seed(1)
    return Forecaster(ModelConfig(request.param, 8, 2)).eval()
