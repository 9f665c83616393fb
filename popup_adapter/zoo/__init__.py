"""The conformance table: does popup_adapter adapt every timm and transformers architecture exactly?

    python -m popup_adapter.zoo                                # all of it (resumable)
    python -m popup_adapter.zoo --timm resnet,vit --transformers none
    python -m popup_adapter.zoo --table docs/conformance.md    # the docs table from the results
    python -m popup_adapter.zoo --architectures docs/architectures.md  # the supported-models page

For one model of every timm family (the smallest variant by parameter count, ``pretrained=False``,
the smallest square input it accepts) and for transformers architectures built from tiny
configs (`TRANSFORMERS`), `check_model` adapts the model (k=0.5) and checks: a
forward and backward pass in which every score gets a finite gradient (and some a nonzero one),
exact kept counts (per expert for an expert bank), masked == merged, the same base fingerprint
and structure when the model is built again under another global seed, and the share of the
model's matrix weights that is masked; `check_reload` then loads the saved artifact
without ``model=`` in a fresh process and compares the outputs. A model that popup_adapter
refuses at ``get_popup_model`` is a row "refused" with the reason; a model whose plain version
does not run here is "not run"; anything else wrong is "FAIL".

Each model runs in a process of its own (a crash or a timeout stays one row); results go to a
JSON-lines file, one row per model, and a rerun skips the models already there.

The package: `transformers_configs` (the tiny configs),
`cases` (which models, and an input each),
`checks` (one model's checks), `table` (the
docs page) and ``__main__`` (the command line, one process per model).
"""

from .cases import Case, case_by_id, timm_case, timm_families, transformers_case
from .checks import Row, check_model, check_reload, finish, forward_output, output_tensor
from .table import write_architectures, write_table
from .transformers_configs import TRANSFORMERS

__all__ = [
    "TRANSFORMERS",
    "Case",
    "Row",
    "case_by_id",
    "check_model",
    "check_reload",
    "finish",
    "forward_output",
    "output_tensor",
    "timm_case",
    "timm_families",
    "transformers_case",
    "write_architectures",
    "write_table",
]
