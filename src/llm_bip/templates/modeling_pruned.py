"""Loads a model folder written by llm-bip whose decoder layers differ in width, with stock transformers alone:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

llm-bip copied this file into the folder, wrote the folder's family into the import below, and named the
class in config.json's ``auto_map``. Each layer's widths (attention heads, key/value heads, FFN channels) are
in config.json's ``per_layer_config``, transformers' own per-layer config; the family's modelling builds
every layer from the global fields instead, so this class rebuilds each decoder layer from its own entry
before the weights are loaded into it. Nothing else differs from the family's model. Needs only torch and
transformers (5.x, with per-layer configs); llm-bip is not needed.
"""

from transformers import LlamaForCausalLM as StockForCausalLM  # the folder's family: llm-bip writes its class here


class PrunedForCausalLM(StockForCausalLM):
    """The family's causal LM, its decoder layer i built from ``config.per_layer_config[i]``."""

    def __init__(self, config):
        if config.is_heterogeneous:
            # The family's code reads the global widths (the widest layer's) while it builds the model;
            # transformers refuses that read on a per-layer config unless it is allowed explicitly.
            config.allow_global_per_layer_attribute_access = True
        super().__init__(config)
        if config.is_heterogeneous:
            layers = self.model.layers
            for i, layer in enumerate(layers):
                # the same layer class, built from layer i's own config, in the dtype the model was built in
                dtype = next(layer.parameters()).dtype
                layers[i] = type(layer)(config.per_layer_config[i], i).to(dtype)
