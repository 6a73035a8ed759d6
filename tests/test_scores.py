"""The LLM-BIP score is what it claims, checked against brute-force removal on tiny blocks."""

import pytest
import torch

from llm_bip.metrics import ScoreOptions, make_metric
from llm_bip.surgery import head_channels
from llm_bip.testing import block_setup, output_change

CASES = [("llama-gqa", s, sc) for s in range(3) for sc in (1.0, 7.0)]
CASES += [("qwen2-gqa", 0, 7.0), ("llama-gqa-bias", 1, 7.0)]


@pytest.mark.parametrize("variant,seed,scale", CASES)
def test_ffn_channel_score_is_exact_change(variant, seed, scale):
    view, inputs, stats, y = block_setup(variant, seed, scale)
    scores = make_metric("bip", ScoreOptions()).score(view, stats, 1).channels
    for j in range(0, view.widths.intermediate_size, 7):
        assert output_change(view, inputs, y, view.down.weight, [j]) == pytest.approx(float(scores[j]), rel=1e-6)


@pytest.mark.parametrize("variant,seed,scale", CASES)
def test_certified_head_score_bounds_removal(variant, seed, scale):
    view, inputs, stats, y = block_setup(variant, seed, scale)
    bounds = make_metric("bip", ScoreOptions(lipschitz="certified")).score(view, stats, 1).heads
    for h in range(view.widths.num_heads):
        change = output_change(view, inputs, y, view.o.weight, head_channels([h], view.head_dim))
        assert 0 < change <= float(bounds[h])


@pytest.mark.parametrize("variant,seed,scale", CASES[:4])
def test_exact_head_score_is_attention_output_change(variant, seed, scale):
    """With no FFN factor the exact head score is ||X_h W_O^h^T||_F, the change of Attn's output."""
    view, inputs, stats, _ = block_setup(variant, seed, scale)
    exact = make_metric("bip", ScoreOptions(lipschitz="none", head_score="exact")).score(view, stats, 1).heads
    channel_sum = make_metric("bip", ScoreOptions(lipschitz="none")).score(view, stats, 1).heads
    x = torch.cat([_o_proj_input(view, h, kw) for h, kw in inputs]).flatten(0, 1)
    for h in range(view.widths.num_heads):
        cols = head_channels([h], view.head_dim)
        expected = float((x[:, cols] @ view.o.weight[:, cols].T.detach()).norm())
        assert float(exact[h]) == pytest.approx(expected, rel=1e-6)
        assert float(channel_sum[h]) >= expected * (1 - 1e-9)  # triangle inequality


def test_centred_exact_head_score_is_change_after_compensation():
    view, inputs, stats, _ = block_setup("llama-gqa-bias", 1, 7.0)
    centred = make_metric("bip", ScoreOptions(lipschitz="none", head_score="exact", centred=True))
    scores = centred.score(view, stats, 1).heads
    x = torch.cat([_o_proj_input(view, h, kw) for h, kw in inputs]).flatten(0, 1).detach()
    for h in range(view.widths.num_heads):
        cols = head_channels([h], view.head_dim)
        xh = x[:, cols] - x[:, cols].mean(0)
        expected = float((xh @ view.o.weight[:, cols].T.detach()).norm())
        assert float(scores[h]) == pytest.approx(expected, rel=1e-5)


def _o_proj_input(view, hidden, kwargs):
    seen = []
    handle = view.o.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            view.layer(hidden, **kwargs[view.index])
    finally:
        handle.remove()
    return seen[0]


def test_spectral_factor_is_the_papers():
    view, _, stats, _ = block_setup("llama-gqa", 0, 7.0)
    base = make_metric("bip", ScoreOptions(lipschitz="none")).score(view, stats, 1).heads
    paper = make_metric("bip", ScoreOptions(lipschitz="spectral")).score(view, stats, 1).heads
    up, down = view.up.weight.detach(), view.down.weight.detach()
    l_ffn = torch.linalg.matrix_norm(up, 2) * torch.linalg.matrix_norm(down, 2)
    assert torch.allclose(paper, base * (1 + float(l_ffn)), rtol=1e-6)


def test_random_and_magnitude_scores():
    view, _, stats, _ = block_setup("llama-gqa", 0, 1.0)
    a = make_metric("random", ScoreOptions(seed=3)).score(view, None, 1)
    b = make_metric("random", ScoreOptions(seed=3)).score(view, None, 1)
    c = make_metric("random", ScoreOptions(seed=4)).score(view, None, 1)
    assert torch.equal(a.channels, b.channels) and not torch.equal(a.channels, c.channels)
    mag = make_metric("magnitude", ScoreOptions()).score(view, None, 1)
    hd = view.head_dim
    q0, o0 = view.q.weight[:hd].detach(), view.o.weight[:, :hd].detach()
    sq_norm = lambda *ws: float(torch.cat([w.flatten() for w in ws]).pow(2).sum())  # noqa: E731
    assert float(mag.heads[0]) == pytest.approx(sq_norm(q0, o0), rel=1e-9)
    k0, v0 = view.k.weight[:hd].detach(), view.v.weight[:hd].detach()
    assert float(mag.kv_heads[0]) == pytest.approx(sq_norm(k0, v0), rel=1e-9)
    ch = [view.gate.weight[5], view.up.weight[5], view.down.weight[:, 5]]
    assert float(mag.channels[5]) == pytest.approx(sq_norm(*(w.detach() for w in ch)), rel=1e-9)
