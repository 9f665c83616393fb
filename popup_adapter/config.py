"""What the user asked for: [`PopupConfig`][popup_adapter.PopupConfig], validated once, at
construction."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

INITS = ("signed_constant", "kaiming_normal", "kaiming_uniform", "keep")
"""The values of [`PopupConfig.init`][popup_adapter.PopupConfig]: how the random base is drawn.

``signed_constant`` (the paper's best) draws ``+-sqrt(2 / fan_in)`` with a random sign,
``kaiming_normal`` and ``kaiming_uniform`` torch's Kaiming draws, each from the seed; ``keep``
leaves the model's own (pretrained) weights as they are. The [concepts](../concepts.md) page
compares them.
"""
#: Initial scores: seeded uniform (the paper), or |W| so the search starts from magnitude pruning.
SCORE_INITS = ("uniform", "magnitude")
METHODS = ("edge_popup", "biprop")
"""The values of [`PopupConfig.method`][popup_adapter.PopupConfig]: what the kept weights are.

``edge_popup`` keeps them as drawn (``W * M``); ``biprop`` (Diffenderfer & Kailkhura, ICLR
2021) replaces them with ``alpha * sign(W)``, ``alpha`` the mean |W| of the layer's kept
weights, recomputed every step. With ``init="signed_constant"`` every |W| of a layer is the
same, so the two coincide: biprop is meant for ``kaiming_normal`` / ``kaiming_uniform``.
"""
SELECTIONS = ("per_layer", "global")
"""The values of [`PopupConfig.selection`][popup_adapter.PopupConfig]: where the top-k is taken.

``per_layer`` (the paper) keeps ``round(k * n)`` of every layer's ``n`` weights; ``global``
keeps the ``round(k * total)`` largest |scores| of all masked layers at once, at least
``min_layer_k`` of each, which lets the layers that matter keep more (see
`popup_adapter.budget`).
"""


def _as_name_list(value: str | list[str] | tuple[str, ...] | None, what: str) -> Any:
    """Normalise a PEFT-style module selector: a regex string, a list of names, or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{what} must be a regex string, a list of module names or None, got {value!r}")


@dataclass
class PopupConfig:
    """Configuration of one edge-popup adapter (one learned mask).

    Args:
        k: fraction of each masked layer's weights that the forward pass KEEPS, in (0, 1].
            ``k=0.3`` keeps the 30% of weights with the largest |score| in every layer.
        target_modules: layers to mask. ``None`` masks every ``nn.Linear``, ``nn.Conv1d/2d/3d``
            and transformers ``Conv1D`` (plus ``nn.Embedding`` with ``mask_embeddings``), first
            and last layers included, as the paper does. Otherwise PEFT's rules: a string is a
            regex that must match the full module name; a list matches a module whose name
            equals an entry or ends with ``"." + entry``.
        exclude_modules: layers never to mask, with the same matching rules.
        modules_to_save: modules trained densely (e.g. a new classifier head) and stored in the
            artifact, one copy per adapter as in PEFT.
        init: how the frozen random base weights are drawn from the seed:
            ``"signed_constant"`` (the paper's best: +-gain/sqrt(fan_in) with a random sign),
            ``"kaiming_normal"``, ``"kaiming_uniform"``, or ``"keep"`` to leave a pretrained base
            untouched (masking a pretrained network, Zhao et al. 2020).
        scale_fan: use ``fan_in * k`` instead of ``fan_in`` in the init's scale (the paper's
            "scaled" variants), which keeps activations' variance after masking.
        seed: the seed every random base tensor and every initial score is derived from, in
            [0, 2<sup>64</sup>).
        train_norms: train the affine parameters of normalisation layers (stored in the
            artifact). By default they are identity and frozen, the paper's non-affine norms.
        mask_embeddings: also mask ``nn.Embedding`` layers when ``target_modules`` is None.
        reseed_modules: with ``init="keep"``, modules whose tensors are nevertheless drawn from
            the seed: a new head that the pretrained checkpoint does not contain is otherwise
            random from torch's global RNG and could not be rebuilt by whoever loads the mask.
        score_init: ``"uniform"`` (the paper: seeded uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)),
            a random initial mask) or ``"magnitude"`` (|W|: the search starts from magnitude
            pruning, which keeps a pretrained network working from the first step).
        method: ``"edge_popup"`` or ``"biprop"`` (binarized kept weights, see `METHODS`).
        selection: ``"per_layer"`` (each layer keeps ``round(k * n)``) or ``"global"`` (the
            ``round(k * total)`` largest |scores| of all masked layers, at least
            ``min_layer_k`` of each: layers that matter keep more).
        ramp_steps: optimizer steps over which the fraction kept falls from 1 to ``k``
            (Zhu & Gupta's cubic), so that global top-k at small ``k`` empties no layer early.
            The training loop reports its steps (`PopupModel.update_search`).
        min_layer_k: with ``selection="global"``, the fraction every layer keeps at least
            (0: one weight), at most ``k``.
        redraw_every: IteRand (Chijiwa et al., NeurIPS 2021): every this many optimizer steps,
            each pruned weight is redrawn from the seed with probability ``redraw_prob``, so
            the search reaches more random weights (0: off). The artifact stores how often
            each kept weight was redrawn, so the trained network still comes from the seed
            (`popup_adapter.redraws`). Its backbone carries no other adapter.
        redraw_prob: IteRand's probability of redrawing a pruned weight, in (0, 1].
    """

    k: float = 0.3
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    init: str = "signed_constant"
    scale_fan: bool = False
    seed: int = 0
    train_norms: bool = False
    mask_embeddings: bool = False
    reseed_modules: list[str] | None = field(default=None)
    score_init: str = "uniform"
    method: str = "edge_popup"
    selection: str = "per_layer"
    ramp_steps: int = 0
    min_layer_k: float = 0.0
    redraw_every: int = 0
    redraw_prob: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)):
            raise TypeError(f"k must be a number in (0, 1], got {self.k!r}")
        self.k = float(self.k)
        if not 0.0 < self.k <= 1.0:
            raise ConfigError(
                f"k={self.k} is outside (0, 1]. k is the fraction of weights KEPT in each layer: "
                "k=0.3 keeps 30%. For 'prune 70%' pass k=0.3."
            )
        if self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.score_init not in SCORE_INITS:
            raise ConfigError(
                f"unknown score_init {self.score_init!r}; choose one of {', '.join(SCORE_INITS)}"
            )
        for name, choices in (("method", METHODS), ("selection", SELECTIONS)):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(choices)}"
                )
        for name in ("ramp_steps", "redraw_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an int >= 0 (0: off), got {value!r}")
        if isinstance(self.redraw_prob, bool) or not isinstance(self.redraw_prob, (int, float)):
            raise ConfigError(f"redraw_prob must be a number in (0, 1], got {self.redraw_prob!r}")
        self.redraw_prob = float(self.redraw_prob)
        if not 0.0 < self.redraw_prob <= 1.0:
            raise ConfigError(f"redraw_prob={self.redraw_prob} is outside (0, 1]")
        if self.redraw_every and self.init == "keep":
            raise ConfigError(
                "redraw_every (IteRand) redraws pruned weights from the seed, which a "
                "pretrained base (init='keep') cannot give back; use a seeded init"
            )
        if isinstance(self.min_layer_k, bool) or not isinstance(self.min_layer_k, (int, float)):
            raise ConfigError(f"min_layer_k must be a number in [0, k], got {self.min_layer_k!r}")
        self.min_layer_k = float(self.min_layer_k)
        if not 0.0 <= self.min_layer_k <= self.k:
            raise ConfigError(
                f"min_layer_k={self.min_layer_k} must lie in [0, k={self.k}]: it is the fraction "
                "each layer keeps at least under global selection"
            )
        if self.min_layer_k and self.selection != "global":
            raise ConfigError(
                "min_layer_k is the per-layer floor of selection='global'; per layer, every "
                "layer keeps k already"
            )
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**64
        ):
            raise ConfigError(f"seed must be an int in [0, 2**64), got {str(self.seed)[:40]!r}")
        if self.scale_fan and self.init == "keep":
            raise ConfigError(
                "scale_fan rescales a random init and has no meaning with init='keep'"
            )
        if self.reseed_modules and self.init != "keep":
            raise ConfigError(
                "reseed_modules only applies to init='keep': every other init "
                "already draws the whole base from the seed"
            )
        for name in ("target_modules", "exclude_modules"):
            setattr(self, name, _as_name_list(getattr(self, name), name))
            if isinstance(getattr(self, name), str):
                try:
                    re.compile(getattr(self, name))
                except re.error as error:
                    raise ConfigError(
                        f"{name}={getattr(self, name)!r} is not a valid regex ({error}); pass a "
                        "regex that matches full module names, or a list of names"
                    ) from error
        for name in ("modules_to_save", "reseed_modules"):
            value = _as_name_list(getattr(self, name), name)
            if isinstance(value, str):
                value = [value]
            setattr(self, name, value)

    def base_defining(self) -> dict[str, Any]:
        """The fields that decide the random base; adapters sharing one backbone must agree.

        Returns:
            ``{field: value}`` of init, seed, scale_fan, the norm policy and reseeded modules.
        """
        fields = {
            "init": self.init,
            "seed": self.seed,
            "scale_fan": self.scale_fan,
            "train_norms": self.train_norms,
            "reseed_modules": self.reseed_modules,
        }
        if self.scale_fan:
            fields["k"] = self.k
        return fields

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data.

        Returns:
            Every field, JSON-serialisable (as the artifact's ``popup_config.json`` stores it).
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PopupConfig:
        """The inverse of [`to_dict`][popup_adapter.PopupConfig.to_dict].

        Args:
            data: fields by name (those missing take their defaults).

        Returns:
            The validated config.

        Raises:
            ConfigError: an unknown key (rather than silently dropped), or an impossible value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown PopupConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)
