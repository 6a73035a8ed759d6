"""Every choice of a pruning run, its checks, and the plan it resolves to.

``PruneConfig`` is what a user asks for; options left unset (None) are the method's choice.
``PruneConfig.check()`` needs no model: run it before anything is loaded. ``PruneConfig.plan()``
resolves it once against the model into a frozen ``PrunePlan``: every choice a concrete value,
which is what everything below the job reads and what the summary records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, get_args

from .errors import PruneError
from .methods import METHODS, method_defaults, method_dense_layers
from .options import (
    CHOICES,
    SCORING_FIELDS,
    Allocation,
    AllocationOptions,
    Compensate,
    Gqa,
    HeadScore,
    Lipschitz,
    Method,
    Normalize,
    ScoreOptions,
    Selection,
    Serving,
    Target,
    option_name,
)

if TYPE_CHECKING:
    from .scores import ScoreRecord


@dataclass
class PruneConfig:
    """Every choice of a pruning run; the CLI's options map onto these fields one to one."""

    ratio: float = 0.2
    method: Method = "bip"
    # None: the method's own choice (methods.py)
    allocation: Allocation | None = None
    normalize: Normalize | None = None
    compensate: Compensate | None = None
    keep_dense: list[int] | None = None
    lipschitz: Lipschitz | None = None
    head_score: HeadScore | None = None
    gqa: Gqa = "groups"
    sequential: bool | None = None
    reconstruct: bool | None = None  # not a scoring setting: scores made without it can be cut with it, and back
    selection: Selection | None = None
    calibration: str = "mix"  # data.MIX_SOURCES; the paper's protocol is "ptb"
    n_samples: int = 64
    seqlen: int = 512
    batch_size: int = 8
    min_channels: float = 0.05
    round_to: int | None = None
    seed: int = 0
    target: Target = "transformers"

    def check(self) -> None:
        """Raise PruneError for any value no run can use; needs no model."""
        self._check_choices()
        self._check_numbers()
        self._check_keep_dense()
        self._check_flags()
        if not isinstance(self.calibration, str) or not self.calibration:
            raise PruneError(f"{option_name('calibration')} must name a dataset or a text file, "
                             f"got {self.calibration!r}")

    def _check_choices(self) -> None:
        """Every option with a fixed set of values holds one of them (or None, where the method chooses)."""
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if not (value is None and _method_chooses(name)) and not _one_of(value, get_args(choices)):
                raise PruneError(f"unknown {option_name(name)} {value!r}; use "
                                 + ", ".join(str(c) for c in get_args(choices)))

    def _check_numbers(self) -> None:
        """The ratio and the channel floor are shares in range; the counts and the seed are whole numbers."""
        if not _is_number(self.ratio) or not 0 < self.ratio < 1:
            raise PruneError(f"{option_name('ratio')} must be in (0, 1), got {self.ratio}")
        if not _is_number(self.min_channels) or not 0 <= self.min_channels < 1:
            raise PruneError(f"{option_name('min_channels')} must be in [0, 1), got {self.min_channels}")
        for name, least in (("n_samples", 1), ("seqlen", 2), ("batch_size", 1), ("round_to", 1)):
            if getattr(self, name) is None and _method_chooses(name):
                continue
            if not _is_int(getattr(self, name)) or getattr(self, name) < least:
                raise PruneError(f"{option_name(name)} must be a whole number >= {least}, got {getattr(self, name)!r}")
        if not _is_int(self.seed):
            raise PruneError(f"{option_name('seed')} must be a whole number, got {self.seed!r}")

    def _check_keep_dense(self) -> None:
        """keep_dense, where given, is a list of layer indices (their range needs the model: dense_layers)."""
        if self.keep_dense is not None and not (isinstance(self.keep_dense, list)
                                                and all(_is_int(i) for i in self.keep_dense)):
            raise PruneError(f"{option_name('keep_dense')} must be a list of layer indices, got {self.keep_dense!r}")

    def _check_flags(self) -> None:
        """sequential and reconstruct are booleans (or None, where the method chooses)."""
        for name in ("sequential", "reconstruct"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (value is None and _method_chooses(name))):
                raise PruneError(f"{option_name(name)} must be True or False, got {value!r}")

    def resolved(self) -> "PruneConfig":
        """A checked copy with every option left to the method filled in from the method's definition;
        refit-aware selection turns the refit on, and refuses a run without it."""
        self.check()
        defaults = method_defaults(self.method)
        chosen = {k: defaults[k] for k, v in asdict(self).items() if v is None and k in defaults}
        config = replace(self, **chosen)
        if config.selection == "refit" and self.reconstruct is None:
            config = replace(config, reconstruct=True)
        if config.selection == "refit" and not config.reconstruct:
            raise PruneError(f"{option_name('selection')} refit chooses units by the error the refit leaves; "
                             f"it needs {option_name('reconstruct')}")
        return config

    def dense_layers(self, num_layers: int) -> list[int]:
        """The indices of the layers kept dense in a model of ``num_layers`` layers (left unset: the
        method's own choice)."""
        if self.keep_dense is None:
            return method_dense_layers(self.method, num_layers)
        dense = set()
        for i in self.keep_dense:
            if not -num_layers <= i < num_layers:
                raise PruneError(f"{option_name('keep_dense')} layer {i} out of range for {num_layers} layers")
            dense.add(i % num_layers)
        return sorted(dense)

    def plan(self, num_layers: int, holds_biases: bool, serving: Serving | None = None) -> "PrunePlan":
        """The run's plan for a model of ``num_layers`` decoder layers that can (``holds_biases``: its
        architecture, and the engine it targets) or cannot hold output biases, served by an engine that
        computes ``serving`` (None: any widths, as transformers does): checked, the method's choices filled
        in, the dense layers and "auto" compensation decided, the engine's limits applied. The one place a
        config is checked and resolved."""
        config = self._for_engine(serving) if serving is not None else self.resolved()
        dense = config.dense_layers(num_layers)
        if len(dense) == num_layers:
            raise PruneError("every layer is kept dense: nothing to prune")
        compensate = holds_biases if config.compensate == "auto" else config.compensate
        values = {**asdict(config), "keep_dense": tuple(dense), "compensate": compensate}
        return PrunePlan(**values)

    def _for_engine(self, serving: Serving) -> "PruneConfig":
        """The resolved config with what the engine cannot compute chosen otherwise where the method chose it,
        refused where the user did: one FFN width for all layers, no output biases, rows of its quantization's
        multiple."""
        engine = f"{option_name('target')} {self.target}"
        if not serving.per_layer and self.allocation not in (None, "uniform"):
            raise PruneError(f"{engine} computes one width for every layer of this family; drop "
                             f"{option_name('allocation')} {self.allocation} (it then allocates uniformly)")
        if not serving.output_biases and self.compensate is True:
            raise PruneError(f"{engine} adds no o_proj/down_proj biases in this family; drop "
                             f"{option_name('compensate')}")
        config = replace(self, round_to=self.round_to or serving.row_multiple).resolved()
        return config if serving.per_layer else replace(config, allocation="uniform")


@dataclass(frozen=True)
class PrunePlan:
    """Every choice of one run on one model, each a concrete value (``PruneConfig.plan``); the fields and
    their order are PruneConfig's, so a summary's ``config`` is this plan."""

    ratio: float
    method: Method
    allocation: Allocation
    normalize: Normalize
    compensate: bool
    keep_dense: tuple[int, ...]
    lipschitz: Lipschitz
    head_score: HeadScore
    gqa: Gqa
    sequential: bool
    reconstruct: bool
    selection: Selection
    calibration: str
    n_samples: int
    seqlen: int
    batch_size: int
    min_channels: float
    round_to: int
    seed: int
    target: Target

    @property
    def metric(self) -> str:
        return METHODS[self.method]["metric"]

    def as_dict(self) -> dict:
        """The plan as JSON holds it (a summary's ``config``)."""
        return {**asdict(self), "keep_dense": list(self.keep_dense)}

    def scoring_settings(self) -> dict:
        """The fields that decide the scores (a record's ``settings``); refit-aware scores depend on the
        attention units too."""
        names = SCORING_FIELDS + (("gqa",) if self.selection == "refit" else ())
        return {k: getattr(self, k) for k in names}

    def allocation_options(self) -> AllocationOptions:
        """The allocator's options."""
        return AllocationOptions(ratio=self.ratio, allocation=self.allocation, gqa=self.gqa, normalize=self.normalize,
                                 min_channels=self.min_channels, round_to=self.round_to)

    def score_options(self) -> ScoreOptions:
        """The metric's options."""
        return ScoreOptions(lipschitz=self.lipschitz, head_score=self.head_score, centred=self.compensate,
                            seed=self.seed)


def config_for_scores(config: PruneConfig, record: ScoreRecord) -> PruneConfig:
    """``config`` with every scoring setting it leaves at its default taken from ``record`` (a
    setting given explicitly must then agree with the record: the Pruner checks)."""
    defaults = PruneConfig()
    return replace(config, **{k: v for k, v in record.settings.items() if getattr(config, k) == getattr(defaults, k)})


def _method_chooses(name: str) -> bool:
    """Whether None is a value of the field ``name``: the method's own choice."""
    return next(f for f in fields(PruneConfig) if f.name == name).default is None


def _one_of(value, choices: tuple) -> bool:
    """``value`` is one of ``choices``, the same type too (True is not 1)."""
    return any(type(value) is type(c) and value == c for c in choices)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
