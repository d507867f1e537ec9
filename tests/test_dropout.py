"""roleplay/dropout.py: GapDropout has nn.Dropout's distribution and gradient, and train.py's swap.

Statistical checks use fixed seeds and bounds of several standard deviations, so they fail on a wrong
rate, scale, clustering or position range, not by chance.
"""

from __future__ import annotations

import importlib
import math

import pytest

torch = pytest.importorskip("torch")
dropout = importlib.import_module("roleplay.dropout")


@pytest.mark.parametrize("p", [0.01, 0.05, 0.1, 0.2])
def test_dropped_positions_are_a_bernoulli_process(p):
    torch.manual_seed(0)
    n, runs = 20_000, 200
    counts = torch.zeros(n)
    pairs = 0
    for _ in range(runs):
        pos = dropout.dropped_positions(n, p)
        assert pos.dtype == torch.long and (pos >= 0).all() and (pos < n).all()
        assert (pos[1:] > pos[:-1]).all()  # sorted, no repeats
        counts[pos] += 1
        hit = torch.zeros(n, dtype=torch.bool)
        hit[pos] = True
        pairs += int((hit[1:] & hit[:-1]).sum())  # neighbours both dropped: p**2 if independent
    total = runs * n
    assert abs(counts.sum().item() / total - p) < 5 * math.sqrt(p * (1 - p) / total)
    # every slot is dropped at the same rate (the first and last slots too: no edge effect)
    assert abs(counts[:100].mean().item() / runs - p) < 5 * math.sqrt(p * (1 - p) / (100 * runs))
    assert abs(counts[-100:].mean().item() / runs - p) < 5 * math.sqrt(p * (1 - p) / (100 * runs))
    # per-slot counts spread as Binomial(runs, p) does
    assert counts.var().item() == pytest.approx(runs * p * (1 - p), rel=0.1)
    pair_total = runs * (n - 1)
    assert abs(pairs / pair_total - p * p) < 5 * math.sqrt(p * p / pair_total) + 1e-4


def test_dropped_positions_draw_more_gaps_when_the_first_draw_falls_short(monkeypatch):
    """The first chunk of gaps is sized to pass n; force a short one and the loop must still cover n."""
    real = dropout.geometric_gaps
    calls = []

    def short_first(count, p, device="cpu"):
        calls.append(count)
        return real(3 if len(calls) == 1 else count, p, device)

    monkeypatch.setattr(dropout, "geometric_gaps", short_first)
    torch.manual_seed(1)
    pos = dropout.dropped_positions(50_000, 0.1)
    assert len(calls) >= 2
    assert pos[-1] > 45_000 and abs(len(pos) / 50_000 - 0.1) < 0.01


def test_geometric_gaps_follow_the_geometric_law():
    torch.manual_seed(2)
    p = 0.05
    gaps = dropout.geometric_gaps(200_000, p)
    assert gaps.min().item() >= 1 and gaps.dtype == torch.float64
    assert gaps.mean().item() == pytest.approx(1 / p, rel=0.02)
    assert (gaps == 1).double().mean().item() == pytest.approx(p, rel=0.05)  # P(gap = 1) = p


def test_gap_dropout_output_and_gradient_are_nn_dropouts():
    torch.manual_seed(3)
    p = 0.1
    x = (torch.rand(64, 300) + 0.5).requires_grad_()  # no zeros of its own
    layer = dropout.GapDropout(p).train()
    y = layer(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    assert abs((~kept).double().mean().item() - p) < 0.01
    w = torch.randn_like(y)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, torch.where(kept, w / (1 - p), torch.zeros_like(w)))
    assert torch.equal(layer.eval()(x), x)  # eval: identity


def test_gap_dropout_non_contiguous_input_and_seeding():
    x = torch.rand(40, 30).t() + 1  # transposed view
    torch.manual_seed(4)
    a = dropout.GapDropout(0.05)(x)
    torch.manual_seed(4)
    b = dropout.GapDropout(0.05)(x.contiguous())
    assert torch.equal(a, b) and torch.equal(a != 0, (a != 0) & (x != 0))
    torch.manual_seed(5)
    assert not torch.equal(dropout.GapDropout(0.05)(x), a)


def test_high_rates_fall_back_to_nn_dropout():
    torch.manual_seed(6)
    x = torch.ones(10_000)
    layer = dropout.GapDropout(0.5)
    torch.manual_seed(6)
    y = layer(x)
    torch.manual_seed(6)
    assert torch.equal(y, torch.nn.functional.dropout(x, 0.5, True))


def test_use_gap_dropout_replaces_the_lora_dropouts_only():
    from peft import LoraConfig, get_peft_model

    from tests.helpers import random_model

    model = get_peft_model(random_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                                      target_modules=["W_pack", "o_proj"]))
    n = model.base_model.model.config.num_hidden_layers * 2
    assert dropout.use_gap_dropout(model) == n
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(layers) == n and all(type(m) is dropout.GapDropout and m.p == 0.05 for m in layers)
    assert dropout.use_gap_dropout(model) == 0  # already swapped
    model.train()
    ids = torch.randint(3, 50, (2, 9))
    model(ids).logits.sum().backward()  # the swapped model trains
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n_, p in model.named_parameters() if "lora_" in n_)
