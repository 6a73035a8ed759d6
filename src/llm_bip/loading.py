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
from .devices import DeviceMap, resolve_dtype
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


def load_model(source: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu", prunable: bool = True,
               device_map: DeviceMap | None = None, offload_folder: Path | None = None):
    """(model, tokenizer) from a local folder, hub id, GGUF file or llm-bip pruned folder. ``prunable``:
    refuse architectures no adapter prunes (evaluation takes any causal LM transformers loads). ``device_map``
    (accelerate's: a strategy or module name -> device; ``device`` is then not read) dispatches the model over
    several devices, modules mapped to disk offloaded to ``offload_folder``."""
    location = resolve_source(source, prunable)
    torch_dtype = resolve_dtype(dtype)
    config = read_config(source, location, prunable)
    placed = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
    check_tied_placement(config, device_map)
    try:
        if config.is_heterogeneous:
            model = load_pruned(location, dtype=dtype)
            model = model.to(device) if device_map is None else dispatch(model, device_map, offload_folder)
        else:
            model = load_stock(location, torch_dtype, **placed)
            model = model.to(device) if device_map is None else model
        tokenizer = AutoTokenizer.from_pretrained(location)
    except PruneError:
        raise
    except Exception as err:
        raise PruneError(f"{source}: cannot load model ({type(err).__name__}: {err})") from err
    check_tokenizer_fits(source, tokenizer, model)
    return model.eval(), tokenizer


def check_tied_placement(config, device_map: DeviceMap | None) -> None:
    """Refuse a map that puts weights tied together (a tied LM head) apart, one of them on disk: accelerate then
    finds no stored copy of the other (it fails to load, or in the first forward)."""
    if not isinstance(device_map, dict) or "disk" not in device_map.values():
        return
    for target, source in (getattr(empty_model(config), "all_tied_weights_keys", None) or {}).items():
        places = [_placement(name, device_map) for name in (target, source)]
        if places[0] != places[1] and "disk" in places:
            raise PruneError(f"--device-map puts {target} on {places[0]} and {source} on {places[1]}, but they "
                             "share one weight, which accelerate cannot split with the disk: map both alike")


def _placement(name: str, device_map: dict):
    """Where ``device_map`` puts the tensor ``name``: its longest prefix's entry."""
    parts = name.split(".")
    keys = (".".join(parts[:n]) for n in range(len(parts), -1, -1))
    return next((device_map[key] for key in keys if key in device_map), None)


def dispatch(model, device_map: DeviceMap, offload_folder: Path | None):
    """An in-memory model placed by ``device_map`` as from_pretrained places one (accelerate's dispatch)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = model._no_split_modules
        memory = None if device_map == "sequential" else get_balanced_memory(
            model, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    dispatch_model(model, device_map, offload_dir=offload_folder)
    model.hf_device_map = device_map
    return model


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


def load_stock(location: Path | str, dtype: torch.dtype, **placed):
    """A model stock transformers can build, refused where its weights do not fill it exactly
    (transformers would initialise the rest at random). ``placed``: from_pretrained's device_map and
    offload_folder."""
    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True, **placed)
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

