"""Which tensors are masked: PEFT's target matching, over modules and the parameters they own.

A target is one parameter of one module (`MaskTarget`). With ``target_modules=None``:

- the ``weight`` of every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and transformers ``Conv1D``
  (subclasses included; ``nn.Embedding`` too with ``mask_embeddings``);
- every fused expert bank of a mixture-of-experts block (transformers' ``*Experts`` modules:
  ``gate_up_proj``, ``down_proj``, ...), each expert's matrix with its own top-k;
- any other module's own matrix parameter named ``weight`` or ``*_weight`` (a router,
  ``nn.MultiheadAttention``'s ``in_proj_weight``) and the ``weight_*`` matrices of recurrent
  layers (``nn.LSTM``, ``nn.GRU``), computed through that module's own forward.

A module named in ``target_modules`` has all its own matrix parameters masked. A module reachable
under several names is one target (found by any of its names) and is masked everywhere it is
used. Matrix weights (`is_matrix_weight`) that none of this masks are reported by
`matrix_coverage`, and `warn_unmasked` names them.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .base import is_expert_bank, is_inside, is_norm_module, is_weight_layer, unmaskable_reason
from .config import PopupConfig
from .errors import BaseMismatchError, TargetModulesError

#: parameter names that say a rank >= 2 tensor is not a weight matrix: position tables, tokens,
#: embeddings, biases
_NOT_A_MATRIX = re.compile(r"embed|token|position|(^|_)pos(_|$)|bias|table", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class MaskTarget:
    """One masked tensor: ``parameter`` of the module named ``module``."""

    module: str
    parameter: str = "weight"

    @property
    def key(self) -> str:
        """The tensor's name in masks and artifacts: the module's name for a ``weight``, else
        ``module.parameter``."""
        return self.module if self.parameter == "weight" else self.parameter_path

    @property
    def parameter_path(self) -> str:
        """The parameter's full name in the plain model."""
        return f"{self.module}.{self.parameter}" if self.module else self.parameter


def module_matches(name: str, selector: str | list[str] | None) -> bool:
    """PEFT's matching rule: a regex must match the full name; a list entry must equal the name
    or be its dotted suffix.

    Args:
        name: a module name.
        selector: a regex, a list of names, or None (matches nothing).

    Returns:
        Whether ``name`` is selected.
    """
    if selector is None:
        return False
    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in selector)


def is_embedding_module(module: nn.Module) -> bool:
    """``nn.Embedding`` and modules named like one (position embeddings of every kind:
    ``PosEmbedRel``, ``LearnedPositionalEmbedding``...).

    Args:
        module: any module.

    Returns:
        Whether it is an embedding.
    """
    return isinstance(module, nn.Embedding) or "Embed" in type(module).__name__


def is_matrix_weight(module: nn.Module, leaf: str, tensor: torch.Tensor | None) -> bool:
    """A parameter that multiplies something: a layer's weight, or a tensor with two or more
    dimensions longer than 1 (not a per-channel gain shaped ``(C, 1, 1, 1)``), not in a norm,
    not an embedding table, not named as a position table, token, embedding or bias, and not
    constant (a layer-scale or gate that its constructor set to one value).

    Args:
        module: the module that owns the parameter.
        leaf: the parameter's name in it.
        tensor: the parameter (None counts as no).

    Returns:
        Whether it is a matrix weight.
    """
    if tensor is None:
        return False
    if is_weight_layer(module) and leaf == "weight":
        return True
    return (
        sum(size > 1 for size in tensor.shape) >= 2
        and not is_norm_module(module)
        and not is_embedding_module(module)
        and not _NOT_A_MATRIX.search(leaf)
        and not (tensor.device.type != "meta" and bool((tensor == tensor.flatten()[0]).all()))
    )


def maskable_parameters(module: nn.Module, named: bool, mask_embeddings: bool) -> list[str]:
    """The parameters of ``module`` itself that are masked: all its matrix parameters when the
    user ``named`` it, else those the default rules pick (see the module docstring).

    Args:
        module: the module.
        named: whether the user's ``target_modules`` named it.
        mask_embeddings: whether ``nn.Embedding`` is masked by default.

    Returns:
        The parameter names, in the module's order.
    """
    if is_weight_layer(module) or (isinstance(module, nn.Embedding) and (named or mask_embeddings)):
        return ["weight"]
    if is_norm_module(module) or is_embedding_module(module):
        return []
    recurrent = isinstance(module, nn.RNNBase)  # weight_ih_l0, weight_hh_l0, ...
    return [
        leaf
        for leaf, tensor in module._parameters.items()
        if is_matrix_weight(module, leaf, tensor)
        and (
            named
            or leaf == "weight"
            or leaf.endswith("_weight")
            or (recurrent and leaf.startswith("weight_"))
            or is_expert_bank(module, tensor)
        )
    ]


def module_aliases(model: nn.Module) -> dict[str, list[str]]:
    """``{name: every name of that module}``, keyed by each module's first name (the one
    ``named_modules()`` gives), for modules reachable under several names.

    Args:
        model: any module tree.

    Returns:
        ``{first name: [every name]}``.
    """
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        canonical = first.setdefault(id(module), name)
        aliases.setdefault(canonical, []).append(name)
    return aliases


def resolve_targets(model: nn.Module, config: PopupConfig) -> list[MaskTarget]:
    """The tensors ``config`` masks, checked.

    Args:
        model: the plain model.
        config: ``target_modules`` / ``exclude_modules`` / ``modules_to_save`` /
            ``mask_embeddings`` decide; None selectors take the default rules.

    Returns:
        The targets, in the model's module order, a module reachable under several names once.

    Raises:
        TargetModulesError: a selector matches nothing (close names are suggested), or names a
            module or tensor that cannot be masked.
    """
    aliases = module_aliases(model)
    canonical = {alias: name for name, names in aliases.items() for alias in names}
    all_names = [alias for alias in canonical if alias]
    saved = [canonical.get(root, root) for root in config.modules_to_save or []]
    for root in config.modules_to_save or []:
        if root not in canonical or not root:
            raise TargetModulesError(
                f"modules_to_save entry {root!r} is not a module of this "
                f"model{_close_names(root, all_names)}"
            )

    def selected(name: str, selector) -> bool:
        return any(module_matches(alias, selector) for alias in aliases[name])

    named = config.target_modules is not None
    if named:
        _check_every_selector_matches(config.target_modules, all_names, "target_modules")
    if config.exclude_modules is not None:
        _check_every_selector_matches(config.exclude_modules, all_names, "exclude_modules")
    targets = []
    for name, module in model.named_modules():
        if not name or (named and not selected(name, config.target_modules)):
            continue
        if selected(name, config.exclude_modules) or is_inside(name, saved):
            continue
        parameters = maskable_parameters(module, named, config.mask_embeddings)
        if named and not parameters:
            raise TargetModulesError(
                f"target {name!r} is a {type(module).__name__}, which has no weight of its own "
                "to mask: supported are nn.Linear, nn.Conv1d/2d/3d, transformers Conv1D, "
                "nn.Embedding and modules holding matrix parameters (expert banks, routers). "
                "Name its Linear/Conv children instead."
            )
        for parameter in parameters:
            reason = unmaskable_reason(module, parameter)
            if reason is None:
                targets.append(MaskTarget(name, parameter))
            elif named:
                raise TargetModulesError(
                    f"target {name!r} ({type(module).__name__}) cannot be masked: {reason}. "
                    "Leave it out of target_modules."
                )
            elif is_weight_layer(module):
                warnings.warn(
                    f"{name} is not masked: {reason}; it keeps its base weight",
                    stacklevel=4,
                )
    if not targets:
        raise TargetModulesError(
            "no layer is left to mask after exclude_modules and modules_to_save; loosen them"
        )
    return targets


def check_stored_targets(
    model: nn.Module, targets: list[MaskTarget], modules_to_save: list[str], where: object
) -> None:
    """Refuse a model that lacks (or cannot mask) a tensor an artifact masks, or a module it
    saves.

    Args:
        model: the plain model (on any device, the meta device included).
        targets: the tensors the artifact masks.
        modules_to_save: the modules it saves.
        where: the artifact, named in the error.

    Raises:
        BaseMismatchError: naming up to five missing modules or tensors.
    """
    names = {name for name, _ in model.named_modules(remove_duplicate=False) if name}
    missing = [root for root in modules_to_save if root not in names]
    for target in targets:
        try:
            module = model.get_submodule(target.module)
        except AttributeError:
            missing.append(target.key)
            continue
        if unmaskable_reason(module, target.parameter) is not None:
            missing.append(target.key)
    if missing:
        raise BaseMismatchError(
            f"{where} masks or saves what this model does not have, or cannot mask: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; the base is not the architecture the mask "
            "was trained on"
        )


@dataclass
class Coverage:
    """How much of a model's matrix weights (`is_matrix_weight`) the masks cover."""

    masked: int
    trained: int
    total: int
    #: ``(parameter name, number of weights)`` of the matrix weights neither masked nor trained
    unmasked: list[tuple[str, int]]

    @property
    def share(self) -> float:
        """The fraction of the matrix weights that is masked."""
        return self.masked / self.total if self.total else 1.0


def matrix_coverage(
    model: nn.Module, targets: list[MaskTarget], trained_roots: list[str]
) -> Coverage:
    """Count the matrix weights of the plain ``model`` (each tensor once, tied ones too):
    masked, trained densely (under ``trained_roots``, e.g. ``modules_to_save``), or neither.

    Args:
        model: the plain model.
        targets: the masked tensors.
        trained_roots: modules trained densely.

    Returns:
        The `Coverage`.
    """
    masked_paths = {target.parameter_path for target in targets}
    seen: set[int] = set()
    masked = trained = total = 0
    unmasked = []
    for module_name, module in model.named_modules():
        for leaf, tensor in module._parameters.items():
            if id(tensor) in seen or not is_matrix_weight(module, leaf, tensor):
                continue
            seen.add(id(tensor))
            full = f"{module_name}.{leaf}" if module_name else leaf
            total += tensor.numel()
            if full in masked_paths:
                masked += tensor.numel()
            elif is_inside(module_name, trained_roots):
                trained += tensor.numel()
            else:
                unmasked.append((full, tensor.numel()))
    return Coverage(masked, trained, total, unmasked)


def warn_unmasked(coverage: Coverage) -> None:
    """Warn that matrix weights stay at their base values (for the default targets, where the
    user did not choose that).

    Args:
        coverage: as `matrix_coverage` counted it.
    """
    if not coverage.unmasked:
        return
    numel = sum(n for _, n in coverage.unmasked)
    names = ", ".join(name for name, _ in coverage.unmasked[:5])
    more = f" and {len(coverage.unmasked) - 5} more" if len(coverage.unmasked) > 5 else ""
    warnings.warn(
        f"{len(coverage.unmasked)} matrix weights ({numel:,d} weights, "
        f"{100 * numel / coverage.total:.1f}% of the model's) are not masked and keep their "
        f"base values: {names}{more}. Name their modules in target_modules to mask them, or in "
        "exclude_modules to silence this.",
        stacklevel=4,
    )


def _check_every_selector_matches(selector: str | list[str], names: list[str], what: str) -> None:
    entries = [selector] if isinstance(selector, str) else selector
    for entry in entries:
        if not any(
            module_matches(n, [entry] if isinstance(selector, list) else selector) for n in names
        ):
            raise TargetModulesError(
                f"{what} entry {entry!r} matches no module of this model"
                f"{_close_names(entry, names)}"
            )


def _close_names(wanted: str, names: list[str]) -> str:
    candidates = sorted(set(names) | {n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(wanted, candidates, n=5, cutoff=0.5)
    return f"; close names: {', '.join(close)}" if close else ""
