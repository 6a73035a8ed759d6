"""Run by test_remote_code.py in a fresh process: load llm-bip's per-layer folders with stock transformers alone,
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``, and save each one's logits on the
given token ids. Any import of llm_bip fails here, wherever it is installed.

    python stock_loader.py IDS.pt OUT_DIR FOLDER...   (writes OUT_DIR/<folder name>.pt)
"""

import importlib.abc
import sys
from pathlib import Path


class NoLlmBip(importlib.abc.MetaPathFinder):
    """First on the meta path: every import of llm_bip or a module of it fails."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "llm_bip":
            raise ImportError(f"{name}: loading a pruned folder must not need llm-bip")
        return None


def llm_bip_modules() -> list[str]:
    return [name for name in sys.modules if name.partition(".")[0] == "llm_bip"]


def main(ids_file: str, out: str, folders: list[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.load(ids_file)
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__name__ == "PrunedForCausalLM", type(model)
        with torch.no_grad():
            torch.save(model(ids).logits, Path(out) / f"{Path(folder).name}.pt")
    assert not llm_bip_modules(), llm_bip_modules()


if __name__ == "__main__":
    sys.meta_path.insert(0, NoLlmBip())
    assert not llm_bip_modules(), llm_bip_modules()
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
