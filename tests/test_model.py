from __future__ import annotations

import torch

from forecaster.model import Forecaster, ModelConfig


def test_seed_architecture_is_the_tutorials() -> None:
    model = Forecaster()
    assert isinstance(model.rnn, torch.nn.RNN)
    assert (model.rnn.input_size, model.rnn.hidden_size, model.rnn.num_layers) == (1, 32, 1)
    assert model.rnn.batch_first
    assert (model.fc.in_features, model.fc.out_features) == (32, 1)


def test_step_by_step_equals_forward(any_cell_model: Forecaster) -> None:
    x = torch.randn(3, 50, 1)  # (B, T, 1)
    with torch.no_grad():
        whole, final = any_cell_model(x)
        state = any_cell_model.init_state(3)
        steps = []
        for t in range(50):
            y, state = any_cell_model.step(x[:, t, 0], state)
            steps.append(y)
    stepped = torch.stack(steps, dim=1)  # (B, T)
    torch.testing.assert_close(stepped, whole[..., 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(state, final, atol=1e-5, rtol=0)


def test_state_shape_carries_lstm_cell_state() -> None:
    model = Forecaster(ModelConfig("lstm", 16, 2))
    assert model.init_state(5).shape == (2, 5, 32)  # (num_layers, n, h and c)


def test_model_config_rejects_unknown_cell() -> None:
    import pytest

    with pytest.raises(ValueError, match="cell"):
        ModelConfig.from_dict({"cell": "transformer", "hidden_size": 4, "num_layers": 1})


def test_serving_tanh_is_in_place_and_within_an_ulp_of_torchs() -> None:
    from forecaster.model import _tanh_

    x = torch.linspace(-12.0, 12.0, 100_002).reshape(-1, 6)  # float32, both tails and zero
    h = x.clone()
    assert _tanh_(h) is h
    torch.testing.assert_close(h, torch.tanh(x), atol=1.2e-7, rtol=1.2e-7)
    assert torch.equal(_tanh_(torch.zeros(3, 2)), torch.zeros(3, 2))


def test_serving_step_writes_into_out_bit_for_bit() -> None:
    torch.manual_seed(2)
    model = Forecaster(ModelConfig("rnn", 8, 2)).eval()
    x, state = torch.randn(5), torch.randn(2, 5, 8)
    before = state.clone()
    with torch.no_grad():
        y, fresh = model.step(x, state)
        out = torch.full((2, 5, 8), float("nan"))
        y_out, written = model.step(x, state, out=out)
    assert written is out
    assert torch.equal(written, fresh) and torch.equal(y_out, y)
    assert torch.equal(state, before)  # the state stepped from is left as it was
