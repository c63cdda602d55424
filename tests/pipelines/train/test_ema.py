"""The weight average a training run saves as its model (pipelines/train/ema.py)."""

import logging

import pytest
import torch

from pipelines.train.ema import WeightEMA


def _module(value: float) -> torch.nn.Linear:
    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def test_the_average_follows_the_warmed_up_decay():
    m = _module(0.0)
    ema = WeightEMA(m, 0.99)
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        with torch.no_grad():
            m.weight.fill_(value)
        d = min(0.99, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * value
        ema.update()
    assert ema.shadow[0] == pytest.approx(torch.full((1, 2), expected))
    assert ema.updates == 4
    # a long run reaches the configured decay
    ema.updates = 10_000
    assert ema.rate() == 0.99


def test_swapped_puts_the_average_in_and_restores_the_trained_weights():
    m = _module(0.0)
    ema = WeightEMA(m, 0.5)
    with torch.no_grad():
        m.weight.fill_(10.0)
    ema.update()
    avg = ema.shadow[0].clone()
    with ema.swapped():
        assert torch.equal(m.weight.detach(), avg)
    assert torch.equal(m.weight.detach(), torch.full((1, 2), 10.0))
    with pytest.raises(RuntimeError), ema.swapped():  # restored even when the block fails
        raise RuntimeError("save failed")
    assert torch.equal(m.weight.detach(), torch.full((1, 2), 10.0))


def test_checkpoint_round_trip_and_a_foreign_one_restarts_the_average(tmp_path, caplog):
    m = _module(1.0)
    ema = WeightEMA(m, 0.9)
    with torch.no_grad():
        m.weight.fill_(3.0)
    ema.update()
    ema.save(tmp_path / "step0000001", rank=0, world=2)
    ema.save(tmp_path / "step0000001", rank=1, world=2)  # unsharded: only rank 0 writes
    assert [p.name for p in (tmp_path / "step0000001").iterdir()] == ["ema.pt"]

    again = WeightEMA(_module(5.0), 0.9)
    assert again.load(tmp_path / "step0000001", rank=0, world=1)  # unsharded averages load at any world size
    assert again.updates == 1 and torch.equal(again.shadow[0], ema.shadow[0])

    other = WeightEMA(torch.nn.Linear(3, 1), 0.9)  # another model's shapes
    with caplog.at_level(logging.WARNING):
        assert not other.load(tmp_path / "step0000001", rank=0, world=1)
    assert "restarts from the resumed weights" in caplog.text
    assert other.updates == 0 and torch.equal(other.shadow[0], other.params[0].detach())


def test_bad_decay_is_rejected():
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(_module(0.0), 1.0)
