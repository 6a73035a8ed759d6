"""Every choice of a pruning run, and its checks.

``PruneConfig.check()`` needs no model: run it before anything is loaded. Which layers stay dense
can only be checked once the layer count is known (``dense_layers``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Literal, TypeVar, get_args

from .allocation import AllocationOptions
from .errors import PruneError
from .methods import METHODS, method_defaults, method_dense_layers
from .metrics import ScoreOptions
from .scores import SCORING_FIELDS, ScoreRecord

Method = Literal["bip", "bip-refit", "bip-unit-zscore", "bip-paper", "random", "magnitude", "wanda-sp", "flap",
                 "llm-pruner"]
Allocation = Literal["uniform", "block", "global"]
Normalize = Literal["none", "output", "zscore", "channels", "log-channels"]
Lipschitz = Literal["spectral", "certified", "none"]
HeadScore = Literal["channels", "exact"]
Gqa = Literal["groups", "heads"]
Compensate = Literal[True, False, "auto"]  # "auto": where the architecture can hold output biases
Selection = Literal["scores", "refit"]  # refit: by the error the refit leaves (selection.py); needs reconstruct

T = TypeVar("T")

# the options that take one of a fixed set of values
CHOICES = {"method": Method, "allocation": Allocation, "normalize": Normalize, "lipschitz": Lipschitz,
           "head_score": HeadScore, "gqa": Gqa, "compensate": Compensate, "selection": Selection}
# the CLI options spelled otherwise than their field (any other field f is --f, with dashes)
FLAGS = {"n_samples": "--samples", "seqlen": "--calib-seqlen"}


def option_name(field: str) -> str:
    """How a message names the PruneConfig field ``field``: by the field and the CLI option that sets it."""
    return f"{field} ({FLAGS.get(field, '--' + field.replace('_', '-'))})"


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
    round_to: int = 1
    seed: int = 0

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

    def resolved(self) -> "PruneConfig":
        """A copy with every option left to the method filled in from the method's definition; refit-aware
        selection turns the refit on, and refuses a run without it."""
        defaults = method_defaults(self.method)
        chosen = {k: defaults[k] for k, v in asdict(self).items() if v is None and k in defaults}
        config = replace(self, **chosen)
        if config.selection == "refit" and self.reconstruct is None:
            config = replace(config, reconstruct=True)
        if config.selection == "refit" and not config.reconstruct:
            raise PruneError(f"{option_name('selection')} refit chooses units by the error the refit leaves; "
                             f"it needs {option_name('reconstruct')}")
        return config

    @property
    def metric(self) -> str:
        return METHODS[self.method]["metric"]

    def scoring_settings(self) -> dict:
        """The fields that decide the scores (a record's ``settings``); refit-aware scores depend on the
        attention units too."""
        fields = SCORING_FIELDS + (("gqa",) if self.selection == "refit" else ())
        return {k: getattr(self, k) for k in fields}

    def compensates(self) -> bool:
        """Whether the run uses bias compensation: known once resolved and, for "auto", decided for the
        model's architecture (the Pruner does both)."""
        compensate = _resolved(self.compensate, "compensate")
        if not isinstance(compensate, bool):
            raise ValueError(f"{option_name('compensate')} {compensate!r} is decided for the model's architecture "
                             "(Pruner) before a run reads it")
        return compensate

    def allocation_options(self) -> AllocationOptions:
        """The allocator's options (of a resolved config)."""
        return AllocationOptions(
            ratio=self.ratio, allocation=_resolved(self.allocation, "allocation"), gqa=self.gqa,
            normalize=_resolved(self.normalize, "normalize"), min_channels=self.min_channels, round_to=self.round_to,
        )

    def score_options(self) -> ScoreOptions:
        """The metric's options (of a resolved config whose compensation is decided: ``compensates``)."""
        return ScoreOptions(lipschitz=_resolved(self.lipschitz, "lipschitz"),
                            head_score=_resolved(self.head_score, "head_score"), centred=self.compensates(),
                            seed=self.seed)


def config_for_scores(config: PruneConfig, record: ScoreRecord) -> PruneConfig:
    """``config`` with every scoring setting it leaves at its default taken from ``record`` (a
    setting given explicitly must then agree with the record: the Pruner checks)."""
    defaults = PruneConfig()
    return replace(config, **{k: v for k, v in record.settings.items() if getattr(config, k) == getattr(defaults, k)})


def _resolved(value: T | None, name: str) -> T:
    """The value of a field left to the method (None) until ``PruneConfig.resolved()`` fills it in."""
    if value is None:
        raise ValueError(f"{option_name(name)} is left to the method until the config is resolved "
                         "(PruneConfig.resolved)")
    return value


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
