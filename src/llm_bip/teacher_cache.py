"""``--teacher-cache DIR``: the teacher's top-k next-token log-probabilities for every training token,
computed once, stored in shards and streamed to the student, so teacher and student never share memory
and every student trained on the same examples reuses one teacher pass.

Per position the cache keeps the k most likely tokens (int32 ids), their log-probabilities at the
run's temperature (float32), and the log of the probability of every other token together (the "rest"
bucket of ``losses.kl_sum``). A cache is made for one teacher (its weight files' fingerprint), one list
of examples (a digest of their token ids), one k and one temperature (``llm_bip_teacher_cache.json``);
a run asking for another is refused. An interrupted build keeps its finished shards in ``DIR.partial``
and the next run continues there; several processes (``accelerate launch``) share the shards out.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from accelerate import PartialState
from safetensors import safe_open
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from .errors import PruneError
from .losses import TopK, top_k
from .outputs import atomic_folder
from .shards import weight_files, write_tensors
from .sources import resolve_source
from .training_data import Example

MANIFEST = "llm_bip_teacher_cache.json"
KEY_FILE = "key.json"  # in DIR.partial: what the finished shards there were made for
EXAMPLES_PER_SHARD = 64
FIELDS = ("indices", "log_probs", "rest")  # of TopK, stored per example as "<example>.<field>"
BATCH_FIELDS = {name: f"teacher_{name}" for name in FIELDS}  # the keys a training batch carries them under


@dataclass(frozen=True)
class CacheKey:
    """What a cache holds: whose log-probabilities, of which examples, how many per position, at which
    temperature."""

    teacher: str
    teacher_weights: str
    examples: str
    top_k: int
    temperature: float

    def differences(self, other: dict) -> list[str]:
        return [name for name, value in asdict(self).items() if other.get(name) != value]


def cache_key(teacher: str, examples: Sequence[Example], top_k: int, temperature: float) -> CacheKey:
    return CacheKey(teacher, weights_fingerprint(teacher), examples_digest(examples), top_k, temperature)


def weights_fingerprint(source: str) -> str:
    """Identifies a model's weights without reading them: its config and weight files' names, sizes and
    modification times (a hub id: the id)."""
    location = resolve_source(source, prunable=False)
    if not isinstance(location, Path):
        return source
    digest = hashlib.sha256((location / "config.json").read_bytes())
    for path in weight_files(location):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def examples_digest(examples: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example["input_ids"]).encode())
    return digest.hexdigest()[:16]


def partial_folder(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.partial")


def is_ready(folder: Path, key: CacheKey) -> bool:
    """True when ``folder`` holds the cache ``key`` describes; False when there is none yet (``folder`` missing);
    a PruneError for a folder that is not such a cache."""
    if not folder.exists():
        return False
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise PruneError(f"--teacher-cache {folder} exists but is not a teacher cache (no {MANIFEST}); choose a new "
                         "folder")
    made_for = json.loads(manifest.read_text())["key"]
    differences = key.differences(made_for)
    if differences:
        mismatches = ", ".join(f"its {d} {made_for.get(d)} (this run: {getattr(key, d)})" for d in differences)
        raise PruneError(f"--teacher-cache {folder} does not fit this run: {mismatches}; choose another folder")
    return True


# --------------------------------------------------------------------------- building


def shard_count(examples: int) -> int:
    return -(-examples // EXAMPLES_PER_SHARD)


def build_cache(teacher, examples: Sequence[Example], folder: Path, key: CacheKey, batch_size: int,
                pad_id: int) -> None:
    """Run ``teacher`` over ``examples`` and write the cache to ``folder`` (through ``DIR.partial``,
    continuing its finished shards). Every process of a distributed run computes its share of the shards."""
    state = PartialState()
    work = partial_folder(folder)
    if state.is_main_process:
        start_work(work, key)
    state.wait_for_everyone()
    mine = range(state.process_index, shard_count(len(examples)), state.num_processes)
    todo = [s for s in mine if not (work / shard_name(s)).is_file()]
    bar = tqdm(total=len(todo) * EXAMPLES_PER_SHARD, desc="teacher cache", disable=not state.is_main_process,
               leave=False)
    for shard in todo:
        part = examples[shard * EXAMPLES_PER_SHARD:(shard + 1) * EXAMPLES_PER_SHARD]
        tensors = {}
        for first in range(0, len(part), batch_size):
            batch = part[first:first + batch_size]
            for offset, found in enumerate(teacher_top_k(teacher, batch, key.top_k, key.temperature, pad_id)):
                tensors.update({f"{first + offset}.{name}": getattr(found, name) for name in FIELDS})
            bar.update(len(batch))
        write_tensors(work / shard_name(shard), tensors)
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        finish_work(work, folder, key, len(examples))
    state.wait_for_everyone()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def start_work(work: Path, key: CacheKey) -> None:
    """Keep the finished shards of an interrupted build of the same cache; start afresh otherwise."""
    key_file = work / KEY_FILE
    if work.exists():
        if not key_file.is_file():
            raise PruneError(f"{work} is in the way of the teacher cache's work folder; remove it")
        if json.loads(key_file.read_text()) != asdict(key):
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(asdict(key)))


def finish_work(work: Path, folder: Path, key: CacheKey, examples: int) -> None:
    """Move the finished shards into ``folder``, with the manifest, atomically."""
    with atomic_folder(folder) as tmp:
        for shard in range(shard_count(examples)):
            (work / shard_name(shard)).rename(tmp / shard_name(shard))
        manifest = {"key": asdict(key), "examples": examples, "examples_per_shard": EXAMPLES_PER_SHARD}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(work)


@torch.no_grad()
def teacher_top_k(teacher, batch: Sequence[Example], k: int, temperature: float, pad_id: int) -> list[TopK]:
    """The teacher's top-k log-probabilities at every position of each example (padded batch, causal: the
    padding after an example does not change its positions)."""
    device = next(teacher.parameters()).device
    ids = pad_sequence([torch.tensor(e["input_ids"]) for e in batch], batch_first=True, padding_value=pad_id)
    lengths = [len(e["input_ids"]) for e in batch]
    mask = (torch.arange(ids.shape[1]) < torch.tensor(lengths)[:, None]).long()
    logits = teacher(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    found = top_k(logits.cpu(), k, temperature)
    return [TopK(found.indices[i, :n], found.log_probs[i, :n], found.rest[i, :n]) for i, n in enumerate(lengths)]


# --------------------------------------------------------------------------- reading


class _TensorFile(Protocol):
    """An open safetensors file (``safetensors.safe_open``), as the reader uses it."""

    def get_tensor(self, name: str) -> torch.Tensor: ...


class CachedExamples(torch.utils.data.Dataset):
    """The training examples, each with its cached top-k teacher log-probabilities (read from the shards
    when the example is asked for)."""

    def __init__(self, examples: Sequence[Example], folder: Path):
        self.examples, self.folder = examples, folder
        self.open_shards: dict[int, _TensorFile] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        shard, row = divmod(index, EXAMPLES_PER_SHARD)
        if shard not in self.open_shards:
            self.open_shards[shard] = safe_open(str(self.folder / shard_name(shard)), "pt")
        stored = self.open_shards[shard]
        return {**self.examples[index],
                **{BATCH_FIELDS[name]: stored.get_tensor(f"{row}.{name}") for name in FIELDS}}


def batch_top_k(inputs: dict) -> TopK | None:
    """Take a batch's cached teacher log-probabilities out of ``inputs`` (None where it has none)."""
    if BATCH_FIELDS["indices"] not in inputs:
        return None
    return TopK(*(inputs.pop(BATCH_FIELDS[name]) for name in FIELDS))


def pad_top_k(features: list[dict], length: int) -> dict[str, torch.Tensor]:
    """The cached fields of ``features``, padded along the sequence to ``length`` and stacked."""
    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, length - t.shape[0]))
    return {key: torch.stack([padded(f[key]) for f in features]) for key in BATCH_FIELDS.values()}

