"""Everything llm-bip writes goes through here: output folders are checked before any work (never an input,
never a folder llm-bip did not write), written under a temporary name and renamed into place, so an
interrupted run leaves nothing that looks complete; single files and cache entries the same way. Also the
names of llm-bip's own files and the library versions recorded with them. Imports only ``errors`` and
``remote_code``."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from safetensors import SafetensorError

from .errors import PruneError
from .remote_code import add_remote_code

SUMMARY_FILE = "llm_bip_summary.json"  # llm-bip prune and finetune
SCORES_FILE = "llm_bip_scores.safetensors"  # llm-bip prune (scores.py)
EVAL_FILE = "llm_bip_eval.json"  # llm-bip eval
SPEED_FILE = "llm_bip_speed.json"  # llm-bip bench-speed
OUTPUT_MARKER = "llm_bip_output.json"  # in every folder llm-bip writes: --overwrite replaces only those

try:
    __version__ = version("llm-bip")  # pyproject.toml's, the one source
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "llm_bip": __version__}


def input_summary(source: str | Path) -> dict:
    """The summary of an llm-bip output folder given as input, or {}."""
    path = Path(source) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def cache_dir() -> Path:
    """llm-bip's cache folder (converted GGUF files, calibration text, measurements); LLM_BIP_CACHE moves it."""
    return Path(os.environ.get("LLM_BIP_CACHE", Path.home() / ".cache" / "llm-bip"))


def check_output_folder(out: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Fail early, before any work, when the output is, holds or lies inside one of ``inputs``, exists
    and may not be replaced, or cannot be created (missing parent folders are made when it is written)."""
    out = Path(out)
    check_apart_from_inputs(out, inputs)
    if out.exists() and not out.is_dir():
        raise PruneError(f"{out} exists and is not a folder")
    if out.exists():
        if not overwrite:
            raise PruneError(f"{out} already exists; pass --overwrite to replace it")
        check_replaceable(out)
    ancestor = next(a for a in out.absolute().parents if a.exists())  # missing parents are made when writing
    if not ancestor.is_dir():
        raise PruneError(f"cannot create {out}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK):
        raise PruneError(f"cannot write to {ancestor}")
    return out


def check_apart_from_inputs(out: Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output folder that is an input, holds one, or lies inside one (hub ids are not paths)."""
    target = out.resolve()
    for given in inputs:
        path = Path(given)
        if not path.exists():
            continue
        source = path.resolve()
        if target == source:
            raise PruneError(f"--out {out} is the input {given}; choose another folder")
        if target in source.parents:
            raise PruneError(f"--out {out} holds the input {given}; choose a folder outside it")
        if source in target.parents:
            raise PruneError(f"--out {out} lies inside the input {given}; choose a folder outside it")


def check_replaceable(out: Path) -> None:
    """``--overwrite`` replaces a folder llm-bip wrote (it holds the marker file) or an empty one, nothing else."""
    if not (out / OUTPUT_MARKER).is_file() and any(out.iterdir()):
        raise PruneError(f"{out} was not written by llm-bip (it holds no {OUTPUT_MARKER}), so --overwrite "
                         "will not replace it; remove it yourself or choose another --out")


def follow_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes the umask gives new files: mkdtemp makes the folder
    private and safetensors writes its files 0600."""
    mask = os.umask(0o022)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on failure it vanishes
    and an existing ``out`` stays as it was. A failed write (full disk, no permission) is a PruneError."""
    out = Path(out)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"written_by": "llm-bip"}) + "\n")
        follow_umask(tmp)
        _move_into_place(tmp, out, overwrite)
    except (OSError, SafetensorError) as err:
        raise PruneError(f"cannot write {out}: {getattr(err, 'strerror', None) or err}") from err
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; a replaced ``out`` is moved aside first, so it is whole until the swap."""
    if not out.exists():
        tmp.rename(out)
        return
    if not overwrite:
        raise PruneError(f"{out} already exists; pass --overwrite to replace it")
    check_replaceable(out)
    old = tmp.with_name(tmp.name + "-replaced")
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_model(model, tokenizer, out: Path, overwrite: bool, extras: Callable[[Path], None] | None = None) -> Path:
    """Write model, tokenizer and any extra files (summary, scores) into ``out`` atomically; a model with
    per-layer widths with the modelling file stock transformers loads it with (``remote_code``)."""
    with atomic_folder(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        add_remote_code(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extras is not None:
            extras(tmp)
    return out



def write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """``write`` a file under a temporary name, then rename it: it is whole or absent, never partly written."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        raise PruneError(f"cannot write {path}: {getattr(err, 'strerror', None) or err}") from err
    finally:
        tmp.unlink(missing_ok=True)  # a failed or interrupted write leaves nothing behind


def write_cache_entry(entry: Path, write: Callable[[str], object]) -> None:
    """Keep a result in the cache file ``entry`` (``write`` writes it to the path it is given, atomically
    renamed); a cache that cannot be written is no error (the next run computes it again)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(entry, write)
    except (OSError, PruneError):
        pass
