"""The modelling file a folder with per-layer widths carries, so that stock transformers loads it without
llm-bip: ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. None of the supported
families' transformers code builds per-layer widths itself, so every such folder needs it; a folder of
uniform widths stays stock. llm-bip itself never runs the file: it builds the family's own classes.
Imports nothing of llm-bip's."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

MODELING_FILE = "modeling_pruned.py"
AUTO_MAP = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.PrunedForCausalLM"}
# the template's one line that names the family's class (Llama's, as shipped)
STOCK_IMPORT = "from transformers import {} as StockForCausalLM"
TEMPLATE_CLASS = "LlamaForCausalLM"


def modeling_source(model_type: str) -> str:
    """The modelling file for a family: the template, its import naming the family's stock causal-LM
    class (transformers' auto mapping of ``model_type``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    template = (files("llm_bip") / "templates" / MODELING_FILE).read_text()
    shipped = STOCK_IMPORT.format(TEMPLATE_CLASS)
    if template.count(shipped) != 1:  # an edited template: never write a folder with Llama's class by mistake
        raise RuntimeError(f"{MODELING_FILE}: the template must hold the line {shipped!r} once")
    return template.replace(shipped, STOCK_IMPORT.format(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]))


def add_remote_code(folder: Path) -> None:
    """Once a model is written to ``folder``: where its config.json holds per-layer widths, copy the
    modelling file in and name it in ``auto_map``; otherwise drop an ``auto_map`` entry of ours that the
    config kept from a per-layer input (the folder is stock)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    before = config.get("auto_map") or {}
    if config.get("per_layer_config") is not None:  # transformers' is_heterogeneous
        (Path(folder) / MODELING_FILE).write_text(modeling_source(config["model_type"]))
        auto_map = {**before, **AUTO_MAP}
    else:
        auto_map = {k: v for k, v in before.items() if AUTO_MAP.get(k) != v}
    if auto_map == before:
        return
    if auto_map:
        config["auto_map"] = auto_map
    else:
        del config["auto_map"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # as transformers writes it
