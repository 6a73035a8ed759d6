"""Loading models: stock transformers folders, hub ids, GGUF files (through their cached conversion) and
llm-bip's folders with per-layer widths; weights that do not fill the model exactly are refused."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .adapters import adapter_for
from .devices import resolve_dtype
from .errors import PruneError
from .shards import read_weights
from .sources import DEFAULT_MODEL, resolve_source


class PerLayerAccessFilter(logging.Filter):
    """Drops transformers' warning that a global width of a per-layer config was read: its own Llama
    code reads them on every load and save of a per-layer checkpoint, which llm-bip allows on purpose
    (surgery.describe_widths keeps the global fields at the widest block)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "for per-layer attribute" not in record.getMessage()


logging.getLogger("transformers.integrations.heterogeneity.configuration_utils").addFilter(PerLayerAccessFilter())


def load_model(source: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu", prunable: bool = True):
    """(model, tokenizer) from a local folder, hub id, GGUF file or llm-bip pruned folder. ``prunable``:
    refuse architectures no adapter prunes (evaluation takes any causal LM transformers loads)."""
    location = resolve_source(source, prunable)
    torch_dtype = resolve_dtype(dtype)
    config = read_config(source, location, prunable)
    try:
        model = load_pruned(location, dtype=dtype) if config.is_heterogeneous else load_stock(location, torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except PruneError:
        raise
    except Exception as err:
        raise PruneError(f"{source}: cannot load model ({type(err).__name__}: {err})") from err
    check_tokenizer_fits(source, tokenizer, model)
    model.eval()
    return model.to(device), tokenizer


def read_config(source: str, location: Path | str, prunable: bool = True):
    """The model's config; a PruneError where it cannot be read or (``prunable``) no adapter supports
    the architecture."""
    try:
        config = AutoConfig.from_pretrained(location)
    except Exception as err:
        raise PruneError(f"{source}: cannot read its config ({type(err).__name__}: {err})") from err
    if prunable:
        adapter_for(config)
    return config


def load_stock(location: Path | str, dtype: torch.dtype):
    """A model stock transformers can build, refused where its weights do not fill it exactly
    (transformers would initialise the rest at random)."""
    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True)
    except SafetensorError as err:
        raise PruneError(f"{location}: a weights file is corrupted or truncated ({err})") from err
    check_weights_match(location, info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"])
    return model.eval()


def check_weights_match(where: Path | str, missing, unexpected, mismatched) -> None:
    """Refuse weights whose names or shapes differ from the model config.json describes."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {sorted(missing)[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} not in the model, e.g. {sorted(unexpected)[0]}")
    if mismatched:
        key, stored, expected = min(mismatched)
        problems.append(f"{len(mismatched)} of another shape, e.g. {key} is {list(stored)}, "
                        f"config.json says {list(expected)}")
    if problems:
        raise PruneError(f"{where}: weights do not match config.json ({'; '.join(problems)})")


def check_tokenizer_fits(source: str, tokenizer, model) -> None:
    """Token ids past the embedding would fail deep inside the first forward pass."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise PruneError(f"{source}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}; "
                         "the tokenizer belongs to another model")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_pruned(folder: str | Path, dtype: str = "float32"):
    """Load a folder written by ``llm-bip prune``; per-layer widths come from ``per_layer_config``."""
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if not config.is_heterogeneous:
        return load_stock(folder, resolve_dtype(dtype))
    model = empty_model(config)
    state = read_weights(folder)
    check_stored_shapes(folder, model, {k: v.shape for k, v in state.items()})
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(resolve_dtype(dtype)).eval()


def empty_model(config, dtype: torch.dtype | None = None):
    """The model ``config`` describes, per-layer widths included, with its parameters on the meta
    device (buffers such as rotary frequencies are real) and a tied LM head tied."""
    from accelerate import init_empty_weights

    adapter = adapter_for(config)
    if config.is_heterogeneous:
        config.allow_global_per_layer_attribute_access = True
    with _quiet_transformers(), init_empty_weights(include_buffers=False):
        # the family's own classes, never the modelling file a per-layer folder carries for stock loaders
        # (config.json's auto_map): transformers takes the local class unless remote code is trusted
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        if config.is_heterogeneous:
            layers = adapter.layers(model)
            for i, layer in enumerate(layers):
                layers[i] = type(layer)(config.per_layer_config[i], i).to(next(layer.parameters()).dtype)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def check_stored_shapes(where: Path | str, model, stored: dict[str, torch.Size]) -> None:
    """Refuse stored weights (name -> shape) that do not fill ``model`` exactly; a tied LM head may be absent."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    check_weights_match(
        where,
        missing=[k for k in shapes if k not in stored and not (tied and "lm_head" in k)],
        unexpected=[k for k in stored if k not in shapes],
        mismatched=[(k, s, shapes[k]) for k, s in stored.items() if k in shapes and s != shapes[k]],
    )

