"""How surgery groups heads; pruned-equals-masked and the shapes after surgery, for every family, are in
test_conformance.py."""


import torch

from llm_bip import PruneConfig, prune
from llm_bip.testing import VARIANTS, random_ids, tiny_model

ALL = sorted(VARIANTS)


def test_heads_mode_keeps_kv_heads_and_removes_evenly():
    model = tiny_model("llama-gqa")  # 6 query heads over 2 KV heads
    _, result = prune(model, None, PruneConfig(ratio=0.3, method="magnitude", gqa="heads"))
    for plan in result.plans.values():
        assert plan.keep_kv_heads == [0, 1]
        per_group = [sum(h // 3 == g for h in plan.keep_heads) for g in range(2)]
        assert per_group[0] == per_group[1] >= 1


def test_groups_mode_removes_whole_kv_groups():
    model = tiny_model("llama-gqa-bias")  # 6 query heads over 3 KV heads
    _, result = prune(model, None, PruneConfig(ratio=0.3, method="magnitude", gqa="groups"))
    for plan in result.plans.values():
        kept_groups = sorted({h // 2 for h in plan.keep_heads})
        assert kept_groups == plan.keep_kv_heads
        assert len(plan.keep_heads) == 2 * len(plan.keep_kv_heads)


def test_pruned_model_generates_with_cache():
    model = tiny_model("llama-gqa", scale=3.0)
    prune(model, None, PruneConfig(ratio=0.3, method="random", allocation="global", gqa="heads"), calib=random_ids())
    assert model.config.is_heterogeneous
    out = model.generate(random_ids(1, 5), max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    # cached greedy decoding agrees with a full forward pass over the generated sequence
    full = model(out[:, :-1]).logits[:, 4:].argmax(-1)
    assert torch.equal(full, out[:, 5:])
