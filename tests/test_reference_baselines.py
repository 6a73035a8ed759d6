"""Each baseline against its reference arithmetic, written out here in plain tensor code (FLAP's
lib/prune.py for flap and wanda-sp, LLM-Pruner's hf_prune.py for llm-pruner, METHOD.md for
magnitude): the kept heads and FFN channels of every layer must be the reference's."""

import copy

import pytest
import torch

from llm_bip import PruneConfig, prune
from llm_bip.testing import random_ids, tiny_model

HD = 8  # head_dim of the tiny models


def projection_inputs(model, ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: the inputs of o_proj and of down_proj over all calibration tokens, one forward."""
    seen = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name, m in (("o", layer.self_attn.o_proj), ("d", layer.mlp.down_proj)):
            hooks.append(m.register_forward_pre_hook(
                lambda _m, a, key=(i, name): seen.__setitem__(key, a[0].reshape(-1, a[0].shape[-1]).double())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return [(seen[i, "o"], seen[i, "d"]) for i in range(len(model.model.layers))]


def kept(model) -> list[tuple[list[int], list[int]]]:
    """Per layer of a model pruned by masking: the heads and channels whose o_proj/down_proj columns are not zero."""
    out = []
    for layer in model.model.layers:
        o, d = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
        heads = [h for h in range(o.shape[1] // HD) if o[:, h * HD:(h + 1) * HD].abs().sum() > 0]
        out.append((heads, [c for c in range(d.shape[1]) if d[:, c].abs().sum() > 0]))
    return out


def mask(layer, heads: list[int], channels: list[int]) -> None:
    """Zero the o_proj columns of ``heads`` and the down_proj columns of ``channels``: the same
    outputs as cutting them."""
    with torch.no_grad():
        for h in heads:
            layer.self_attn.o_proj.weight[:, h * HD:(h + 1) * HD] = 0
        layer.mlp.down_proj.weight[:, channels] = 0


def ours(model, ids, **config) -> list[tuple[list[int], list[int]]]:
    """The heads (query heads) and channels our pruner keeps, per layer, by original index."""
    _, result = prune(copy.deepcopy(model), None, PruneConfig(**config), calib=ids)
    return [(plan.keep_heads, plan.keep_channels) for _, plan in sorted(result.plans.items())]


def lowest(values: torch.Tensor, n: int) -> list[int]:
    return sorted(torch.argsort(values, stable=True)[:n].tolist())


def reference_flap(model, ids, ratio: float, group: int):
    """FLAP, structure AL-AM, metric WIFV; ``group`` query heads per removable attention unit.

    Returns the removed (heads, channels) per layer and the parameters they hold."""
    stats = projection_inputs(model, ids)
    attn, mlp = [], []
    for layer, (x, a) in zip(model.model.layers, stats):
        w_o = layer.self_attn.o_proj.weight.detach().double()
        w_d = layer.mlp.down_proj.weight.detach().double()
        attn.append((x.var(0, unbiased=False) * w_o.pow(2).sum(0)) ** 2)
        mlp.append(a.var(0, unbiased=False) * w_d.pow(2).sum(0))
    standardise = lambda m: (m - m.mean(1, keepdim=True)) / m.std(1, keepdim=True)  # noqa: E731
    n_layers = len(stats)
    attn_metric = standardise(torch.stack(attn)).reshape(n_layers, -1, group * HD).mean(2)
    mlp_metric = standardise(torch.stack(mlp))
    cfg = model.config
    h, kv_per_unit = cfg.hidden_size, group * cfg.num_key_value_heads // cfg.num_attention_heads
    unit_params = group * HD * 2 * h + kv_per_unit * HD * 2 * h  # q rows + o columns, k + v rows
    channel_params = 3 * h
    metric = torch.cat([attn_metric.flatten(), mlp_metric.flatten()])
    weight = torch.ones_like(metric)
    weight[:attn_metric.numel()] = unit_params / channel_params
    order = torch.argsort(metric, descending=True)
    cum = torch.cumsum(weight[order], 0)
    threshold = metric[order][torch.argmin((cum - weight.sum() * (1 - ratio)).abs())]
    removed_units = [(attn_metric[i] <= threshold).nonzero().flatten().tolist() for i in range(n_layers)]
    removed_channels = [(mlp_metric[i] <= threshold).nonzero().flatten().tolist() for i in range(n_layers)]
    removed_heads = [[u * group + j for u in units for j in range(group)] for units in removed_units]
    params = sum(len(u) * unit_params for u in removed_units) + sum(len(c) for c in removed_channels) * channel_params
    return removed_heads, removed_channels, params


def block_params(model) -> int:
    return sum(m.weight.numel() for layer in model.model.layers
               for m in (*(getattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
                         layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))


@pytest.mark.parametrize("variant,group,share", [("llama-mha", 1, 0.3), ("llama-gqa", 3, 0.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flap_keeps_what_the_reference_keeps(variant, group, share, seed):
    """One threshold over standardised WIFV (attention squared once more) of heads (KV groups under
    GQA) and channels, each weighted by the parameters it removes. The ratio given to our pruner is
    the reference's removed share (less half a parameter), so both stop at the same unit; the
    reference has no per-layer minimum, nor biases (its compensation is tested apart)."""
    model = tiny_model(variant, layers=3, seed=seed, scale=5.0).double()
    ids = random_ids(8, 16, seed=seed)
    heads, channels, params = reference_flap(model, ids, share, group)
    ratio = (params - 0.5) / block_params(model)
    got = ours(model, ids, ratio=ratio, method="flap", compensate=False, min_channels=0.0)
    n_heads, n_channels = model.config.num_attention_heads, model.config.intermediate_size
    expected = [([h for h in range(n_heads) if h not in hs], [c for c in range(n_channels) if c not in cs])
                for hs, cs in zip(heads, channels)]
    assert got == expected
    assert any(hs for hs in heads) and sum(map(len, channels)) > 0  # both kinds compete


def reference_uniform_mask(model, ids, head_scores, channel_scores, ratio: float, sequential: bool):
    """Remove int(ratio * H) heads and int(ratio * I) channels of least score from every layer, in
    order, scoring each layer on the outputs of the layers pruned before it (``sequential``) or on
    the dense model; the model is masked in place. Returns what each layer keeps."""
    dense = projection_inputs(model, ids)
    for i, layer in enumerate(model.model.layers):
        x, a = projection_inputs(model, ids)[i] if sequential else dense[i]
        heads, channels = head_scores(layer, x), channel_scores(layer, a)
        mask(layer, lowest(heads, int(ratio * heads.numel())), lowest(channels, int(ratio * channels.numel())))
    return kept(model)


def test_wanda_sp_keeps_what_the_reference_keeps():
    """FLAP's prune_wanda_sp: per input column, mean over rows of |W| * sqrt(mean x^2); a head sums
    its columns; the same share of every layer, layer by layer on the pruned layers' outputs. At
    25% of 4 heads and 64 channels the reference's counts are whole: 1 head, 16 channels."""
    model = tiny_model("llama-mha", layers=3, scale=5.0).double()
    ids = random_ids(8, 16)

    def columns(w, x):
        return (w.detach().double().abs() * x.pow(2).mean(0).sqrt()).mean(0)

    expected = reference_uniform_mask(
        copy.deepcopy(model), ids,
        lambda layer, x: columns(layer.self_attn.o_proj.weight, x).view(-1, HD).sum(1),
        lambda layer, a: columns(layer.mlp.down_proj.weight, a), 0.25, sequential=True)
    assert ours(model, ids, ratio=0.25, method="wanda-sp") == expected


def taylor(m, dim: int) -> torch.Tensor:
    return (m.weight * m.weight.grad).abs().sum(dim).detach()


def test_llm_pruner_keeps_what_the_reference_keeps():
    """LLM-Pruner's block-wise Taylor importance (param_first, group reduction sum): a head sums
    |w * dL/dw| over its q, k, v rows and o_proj columns; a channel over its gate/up rows and
    down_proj column; the same share of every pruned layer. Its LLaMA-7B recipe keeps the first 4
    and last 2 of 32 layers dense: in 3 layers, none."""
    model = tiny_model("llama-mha", layers=3, scale=3.0).double()
    ids = random_ids(8, 16)
    graded = copy.deepcopy(model)
    graded(ids, labels=ids).loss.backward()
    expected = []
    for layer in graded.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        heads = (taylor(att.q_proj, 1) + taylor(att.k_proj, 1) + taylor(att.v_proj, 1)
                 + taylor(att.o_proj, 0)).view(-1, HD).sum(1)
        channels = taylor(mlp.gate_proj, 1) + taylor(mlp.up_proj, 1) + taylor(mlp.down_proj, 0)
        drop_h, drop_c = lowest(heads, 1), lowest(channels, 16)
        expected.append(([h for h in range(4) if h not in drop_h], [c for c in range(64) if c not in drop_c]))
    assert ours(model, ids, ratio=0.25, method="llm-pruner") == expected


def test_llm_pruner_heads_mode_leaves_kv_out_and_recipe_keeps_layers_dense():
    """Removing query heads only (--gqa heads), a head's importance has no K/V terms: the heads
    kept in each group are those of highest q + o importance. 32 layers keep 0-3 and 30-31 dense."""
    model = tiny_model("llama-gqa", layers=3, scale=3.0).double()
    ids = random_ids(8, 16)
    graded = copy.deepcopy(model)
    graded(ids, labels=ids).loss.backward()
    got = ours(model, ids, ratio=0.25, method="llm-pruner", gqa="heads")
    for layer, (heads, _) in zip(graded.model.layers, got):
        q_o = (taylor(layer.self_attn.q_proj, 1) + taylor(layer.self_attn.o_proj, 0)).view(-1, HD).sum(1)
        per_group = len(heads) // 2
        for g in range(2):
            members = torch.arange(3 * g, 3 * g + 3)
            best = sorted(members[torch.argsort(q_o[members], descending=True)[:per_group]].tolist())
            assert [h for h in heads if h in members.tolist()] == best
    assert PruneConfig(method="llm-pruner").dense_layers(32) == [0, 1, 2, 3, 30, 31]
    assert PruneConfig(method="llm-pruner").dense_layers(30) == [0, 1, 2, 3, 28, 29]
    assert PruneConfig(method="llm-pruner", keep_dense=[]).dense_layers(32) == []


def test_magnitude_keeps_what_the_reference_keeps():
    """L2 norm of all the unit's weights: a multi-head attention head's q, k, v rows and o columns;
    a channel's gate/up rows and down column; the same share of every layer."""
    model = tiny_model("llama-mha", layers=3, scale=5.0).double()
    expected = []
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        rows = lambda m: m.weight.detach().pow(2).sum(1)  # noqa: E731
        cols = lambda m: m.weight.detach().pow(2).sum(0)  # noqa: E731
        heads = (rows(att.q_proj) + rows(att.k_proj) + rows(att.v_proj) + cols(att.o_proj)).view(-1, HD).sum(1).sqrt()
        channels = (rows(mlp.gate_proj) + rows(mlp.up_proj) + cols(mlp.down_proj)).sqrt()
        drop_h, drop_c = lowest(heads, 1), lowest(channels, 16)
        expected.append(([h for h in range(4) if h not in drop_h], [c for c in range(64) if c not in drop_c]))
    assert ours(model, None, ratio=0.25, method="magnitude") == expected
