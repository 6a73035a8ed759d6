"""Zero-shot accuracy through lm-evaluation-harness, on a model already in memory (so models with
per-layer widths work too). lm_eval is imported only here, inside the functions: it is slow to import.

Each task reports acc, and acc_norm where the task defines it (log-likelihood divided by the
choice's length in characters); the average over tasks takes acc_norm where present, else acc.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .env import offline
from .errors import PruneError
from .tasks import TASKS_DIR

if TYPE_CHECKING:
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

METRICS = ("acc", "acc_norm")
BATCH_SIZE = 8
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
AVERAGED = "acc_norm where the task has it, else acc"


@contextmanager
def _quiet_lm_eval():
    """lm_eval warns about every defaulted config field and every in-memory model; keep errors only."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...], with_lm_eval_tasks: bool) -> TaskManager:
    """Index of the task YAMLs under ``paths`` (and lm_eval's own, which takes tens of seconds:
    cached for repeated calls)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=with_lm_eval_tasks)


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def load_tasks(names: Sequence[str], include_path: Sequence[str | Path] | None = None) -> dict[str, Task]:
    """Load tasks by name (groups expand to their tasks), data included, so that a task that cannot
    run fails before any model is loaded. Looks in llm-bip's shipped tasks, the ``include_path``
    folders of task YAMLs, then lm_eval's own tasks."""
    if not names:
        raise PruneError("no tasks given")
    for folder in include_path or ():
        if not Path(folder).is_dir():
            raise PruneError(f"--include-path {folder}: no such folder")
    paths = (str(TASKS_DIR), *(str(Path(p).resolve()) for p in include_path or ()))
    manager = _task_manager(paths, False)
    if not set(names) <= set(manager.all_tasks):
        manager = _task_manager(paths, True)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise PruneError(f"unknown task(s) {', '.join(unknown)}: `lm-eval ls tasks` lists lm_eval's tasks, "
                         f"--include-path adds folders of task YAMLs; llm-bip ships {', '.join(shipped_tasks())}")
    tasks = {}
    for name in names:
        tasks.update(_load_task(manager, name))
    return tasks


def _load_task(manager: TaskManager, name: str) -> dict[str, Task]:
    try:
        with _quiet_lm_eval():
            tasks = manager.load([name])["tasks"]
    except ConnectionError as err:  # what datasets raises when the hub is offline or unreachable
        hub = "offline here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if offline(*OFFLINE_VARS) else "unreachable"
        raise PruneError(f"task {name!r} needs its data from the Hugging Face hub, which is {hub}; pass folders "
                         f"of local task YAMLs with --include-path (llm-bip ships {', '.join(shipped_tasks())})"
                         ) from err
    except Exception as err:
        raise PruneError(f"task {name!r} could not be loaded: {type(err).__name__}: {err}") from err
    for task_name, task in tasks.items():
        if not set(METRICS) & set(task.aggregation()):
            raise PruneError(f"task {task_name!r} reports no accuracy (metrics: {', '.join(task.aggregation())}); "
                             "llm-bip eval runs multiple-choice and log-likelihood tasks")
    return tasks


def zero_shot(model, tokenizer, tasks: Sequence[str] | dict[str, Task],
              include_path: Sequence[str | Path] | None = None, batch_size: int | None = None,
              limit: int | None = None, num_fewshot: int = 0) -> dict:
    """Accuracy of ``model`` on ``tasks`` (names, or tasks from ``load_tasks``); ``limit`` scores only
    the first N examples of each task. Returns per-task scores and their average (see AVERAGED)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if not isinstance(tasks, dict):
        tasks = load_tasks(tasks, include_path)
    with _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size or BATCH_SIZE)
        # the tasks are loaded: an empty manager stops simple_evaluate from indexing every lm_eval task
        results = lm_eval.simple_evaluate(lm, tasks=list(tasks.values()), num_fewshot=num_fewshot, limit=limit,
                                          log_samples=False, task_manager=_task_manager((), False))
    scores = {name: task_scores(results["results"][name], results["n-samples"][name]["effective"])
              for name in tasks}
    average = sum(s[s["averaged"]] for s in scores.values()) / len(scores)
    return {"tasks": scores, "average": average, "averaged": AVERAGED, "num_fewshot": num_fewshot, "limit": limit}


def task_scores(metrics: dict, n: int) -> dict:
    """acc / acc_norm with their standard errors from lm_eval's 'metric,filter' keys."""
    scores: dict[str, float | str] = {"n": n}
    for metric in METRICS:
        if f"{metric},none" in metrics:
            scores[metric] = metrics[f"{metric},none"]
            scores[f"{metric}_stderr"] = metrics[f"{metric}_stderr,none"]
    scores["averaged"] = "acc_norm" if "acc_norm" in scores else "acc"
    return scores


def _percent(scores: dict, metric: str) -> str:
    if metric not in scores:
        return ""
    stderr = scores[f"{metric}_stderr"]
    spread = f" ± {100 * stderr:.2f}" if isinstance(stderr, float) else ""  # lm_eval gives "N/A" for n = 1
    return f"{100 * scores[metric]:.2f}{spread}"


def zero_shot_table(result: dict) -> str:
    """Markdown table (also readable in a console) in %: one row per task, then the average of the
    score column."""
    lines = ["| task | n | acc | acc_norm | score |", "|---|---:|---:|---:|---:|"]
    for name, s in result["tasks"].items():
        lines.append(f"| {name} | {s['n']} | {_percent(s, 'acc')} | {_percent(s, 'acc_norm')} "
                     f"| {100 * s[s['averaged']]:.2f} |")
    lines.append(f"| average | | | | {100 * result['average']:.2f} |")
    return "\n".join(lines) + f"\nscore: {result['averaged']}"
