"""Refit-aware selection: the greedy removal is the brute-force best step by step, its errors are the refit's,
ties follow the prior, the engine scores each block with it, and it refuses a run without the refit."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_fails_cleanly, prune_args

from llm_bip import PruneConfig, prune
from llm_bip.adapters import adapter_for
from llm_bip.errors import PruneError
from llm_bip.outputs import SCORES_FILE
from llm_bip.scores import ScoreRecord, load_scores, save_scores
from llm_bip.selection import greedy_removal
from llm_bip.surgery import RIDGE
from llm_bip.testing import random_ids, tiny_model
from llm_bip.units import attention_units


def problem(seed: int, n: int = 8, d: int = 5, tokens: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [d, n], Gram of inputs [n, n]) with correlated inputs, float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return torch.randn(d, n, generator=g, dtype=torch.float64), x.T @ x


def refit_error(weight: torch.Tensor, gram: torch.Tensor, kept: list[int]) -> float:
    """Independent: the damped least-squares error of refitting the outputs x W^T on the inputs ``kept``,
    min_B ||x_K B^T - x W^T||^2 + lambda ||B||^2 - lambda ||W||^2, with H = G + lambda I: tr(W H W^T) -
    tr(W H_:K H_KK^-1 H_K: W^T)."""
    h = gram + RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    total = torch.trace(weight @ h @ weight.T)
    if not kept:
        return float(total)
    k = torch.tensor(kept)
    explained = weight @ h[:, k] @ torch.linalg.solve(h[k][:, k], h[k] @ weight.T)
    return float(total - torch.trace(explained))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("unit_size", [1, 2])
def test_each_step_removes_the_unit_whose_refit_leaves_least_error(seed, unit_size):
    weight, gram = problem(seed)
    units = torch.arange(8).view(-1, unit_size)
    order, errors = greedy_removal(weight, gram, units, torch.zeros(len(units)))
    assert sorted(order) == list(range(len(units)))
    removed: list[int] = []
    for step, unit in enumerate(order):
        alive = [u for u in range(len(units)) if u not in removed]
        before = refit_error(weight, gram, kept_columns(units, removed))
        after = {u: refit_error(weight, gram, kept_columns(units, removed + [u])) for u in alive}
        assert after[unit] == pytest.approx(min(after.values()), rel=1e-9, abs=1e-9)
        assert float(errors[step]) == pytest.approx(after[unit] - before, rel=1e-7, abs=1e-7)
        removed.append(unit)


def kept_columns(units: torch.Tensor, removed: list[int]) -> list[int]:
    return [int(c) for u in range(len(units)) if u not in removed for c in units[u]]


def test_a_unit_the_others_can_re_express_goes_first():
    """Column 0 has the largest output, but column 1 carries the same input: the refit makes it free to remove,
    whereas a one-shot score (its output norm) keeps it longest."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64)
    x[:, 1] = x[:, 0] * 0.5
    weight = torch.randn(4, 6, generator=g, dtype=torch.float64)
    weight[:, 0] *= 20
    gram = x.T @ x
    output_norms = (x[:, None, :] * weight[None]).pow(2).sum((0, 1)).sqrt()
    assert int(output_norms.argmax()) == 0
    order, _ = greedy_removal(weight, gram, torch.arange(6)[:, None], output_norms)
    assert order[0] in (0, 1)


def test_ties_go_to_the_prior():
    weight, gram = problem(1)
    weight[:, [2, 5, 6]] = 0  # free to remove, all three
    prior = torch.tensor([0.0, 0, 3, 0, 0, 1, 2, 0])
    order, errors = greedy_removal(weight, gram, torch.arange(8)[:, None], prior)
    assert order[:3] == [5, 6, 2] and errors[:3].abs().max() < 1e-12


def test_wide_projections_remove_several_units_a_step(monkeypatch):
    monkeypatch.setattr("llm_bip.selection.GREEDY_STEPS", 2)
    weight, gram = problem(3)
    order, errors = greedy_removal(weight, gram, torch.arange(8)[:, None], torch.zeros(8))
    h = gram + RIDGE * gram.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    single = weight.pow(2).sum(0) / torch.linalg.inv(h).diagonal()
    assert sorted(order[:4]) == sorted(torch.argsort(single)[:4].tolist())
    assert torch.allclose(errors[:4], single.sort().values[:4])


def block0_grams(model, calib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent: the Grams of [x, 1] for block 0's o_proj and down_proj inputs on the dense model."""
    layer, sums = model.model.layers[0], {}

    def keep(name):
        def hook(_module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
            sums[name] = sums.get(name, 0) + x.T @ x
        return hook

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(keep("attn")),
               layer.mlp.down_proj.register_forward_pre_hook(keep("ffn"))]
    with torch.no_grad():
        model(calib)
    for h in handles:
        h.remove()
    return sums["attn"], sums["ffn"]


def test_engine_orders_each_block_by_the_greedy_removal():
    model, calib = tiny_model("llama-gqa", layers=3, scale=5.0), random_ids(8, 16, seed=3)
    attn_gram, ffn_gram = block0_grams(model, calib)
    o, down = (m.weight.detach().double() for m in (model.model.layers[0].self_attn.o_proj,
                                                    model.model.layers[0].mlp.down_proj))
    _, result = prune(model, None, PruneConfig(ratio=0.3, method="bip-refit"), calib=calib)
    scores = result.record.scores[0]
    zero_bias = torch.zeros(o.shape[0], 1, dtype=torch.float64)
    channels, _ = greedy_removal(torch.cat([down, zero_bias], 1), ffn_gram, torch.arange(down.shape[1])[:, None],
                                 torch.zeros(down.shape[1]))
    assert torch.argsort(scores.channels, stable=True).tolist() == channels
    n_rep = 3  # 6 query heads over 2 KV heads
    groups = torch.arange(o.shape[1]).view(2, -1)
    attn, _ = greedy_removal(torch.cat([o, zero_bias], 1), attn_gram, groups, torch.zeros(len(groups)))
    group_scores = scores.heads.view(-1, n_rep).sum(1)
    assert torch.argsort(group_scores, stable=True).tolist() == attn
    assert result.config.reconstruct and result.summary()["config"]["selection"] == "refit"
    assert result.record.settings["selection"] == "refit" and result.record.settings["gqa"] == "groups"


@pytest.mark.parametrize("method,gqa", [("bip", "groups"), ("flap", "groups"), ("magnitude", "heads"),
                                        ("bip-unit-zscore", "groups")])
def test_the_method_decides_how_many_units_the_refit_which(method, gqa):
    """Every block loses as many heads and channels as under the method's own selection (its scores are
    only handed out again), and some block loses other units."""
    calib = random_ids(8, 16, seed=3)
    runs = {}
    for selection in ("scores", "refit"):
        model = tiny_model("llama-gqa", layers=3, scale=5.0)
        config = PruneConfig(ratio=0.3, method=method, gqa=gqa, selection=selection, reconstruct=True)
        runs[selection] = prune(model, None, config, calib=calib)[1]
    assert runs["refit"].widths_after == runs["scores"].widths_after
    plans = zip(runs["scores"].plans.values(), runs["refit"].plans.values())
    assert any(a.keep_channels != b.keep_channels or a.keep_heads != b.keep_heads for a, b in plans)
    for i, s in runs["scores"].record.scores.items():
        moved = runs["refit"].record.scores[i]
        assert torch.equal(moved.channels.sort().values, s.channels.double().sort().values)
        assert torch.equal(moved.heads.sort().values, s.heads.sort().values)


def test_refit_aware_selection_turns_the_refit_on_and_refuses_a_run_without_it():
    assert PruneConfig(method="flap", selection="refit").resolved().reconstruct is True
    with pytest.raises(PruneError, match="needs reconstruct"):
        PruneConfig(method="bip-refit", reconstruct=False).resolved()


def test_cli_refuses_selection_without_refit_in_one_line(capsys, tiny_model_dir, calib_text_file, work):
    out = work / "out"
    argv = prune_args(tiny_model_dir, out, calib_text_file, "--selection", "refit", "--no-reconstruct")
    assert_fails_cleanly(capsys, argv, out, [tiny_model_dir], "selection", "--reconstruct")


def test_scores_files_written_before_selection_existed_still_match(tmp_path):
    model, calib = tiny_model("llama-gqa", layers=2, scale=5.0), random_ids(8, 16, seed=3)
    _, result = prune(model, None, PruneConfig(ratio=0.3, reconstruct=False), calib=calib)
    old = dict(result.record.settings)
    del old["selection"]
    save_scores(tmp_path / SCORES_FILE, ScoreRecord(**{**result.record.__dict__, "settings": old}))
    assert load_scores(tmp_path).settings["selection"] == "scores"
    fresh = tiny_model("llama-gqa", layers=2, scale=5.0)
    prune(fresh, None, PruneConfig(ratio=0.3, reconstruct=False), record=load_scores(tmp_path))


def test_group_units_cover_whole_kv_groups():
    """The columns of every attention unit in ``groups`` mode are its heads' channels, in order."""
    model = tiny_model("llama-gqa", layers=1)
    view = adapter_for(model.config).blocks(model)[0]
    units = attention_units(view.widths, "groups")
    assert units == [[0, 1, 2], [3, 4, 5]]
    assert attention_units(view.widths, "heads") == [[h] for h in range(view.widths.num_heads)]
    assert list(itertools.chain(*units)) == list(range(view.widths.num_heads))
