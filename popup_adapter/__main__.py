"""The command line: ``python -m popup_adapter inspect PATH_OR_REPO`` looks inside an artifact,
no code needed; ``python -m popup_adapter build-kernels`` compiles the fused CPU kernels ahead
of the first training step (an install step, e.g. before several processes start at once)."""

from __future__ import annotations

import argparse
import sys
import traceback

from .artifact import artifact_summary
from .errors import PopupError
from .hub import open_artifact
from .kernels import load_kernels
from .specs import describe


def inspect_artifact(path_or_repo_id: str, revision: str | None = None) -> str:
    """The report ``inspect`` prints: base, k, seed, fingerprint, and each layer's bytes.

    Args:
        path_or_repo_id: an artifact folder or a Hub repo id.
        revision: a branch, tag or commit of the Hub repo.

    Returns:
        The report, one line per field and one per masked layer.

    Raises:
        ArtifactError: the artifact is missing or malformed.
    """
    artifact = open_artifact(path_or_repo_id, revision)
    summary = artifact_summary(artifact)
    config = artifact.config
    bits_per_weight = 8 * summary["mask_bytes"] / summary["weights"]
    lines = [
        f"artifact:     {artifact.folder}",
        f"base:         {describe(artifact.base_spec)}",
        f"k (kept):     {config.k}",
        f"seed / init:  {config.seed} / {config.init}"
        + (" (scale_fan)" if config.scale_fan else ""),
        f"fingerprint:  {artifact.base_fingerprint}",
        f"masked:       {len(summary['layers'])} layers, {summary['weights']:,d} weights",
        f"mask bytes:   {summary['mask_bytes']:,d} ({bits_per_weight:.4f}"
        f" bits/weight; entropy bound {summary['entropy_bytes']:,.0f}, packed bits "
        f"{summary['packed_bytes']:,d})",
        f"other state:  {summary['state_bytes']:,d} bytes; "
        f"tensor file {summary['file_bytes']:,d} bytes",
        "",
        f"{'layer':<48} {'shape':<20} {'kept':>10} {'enc':>6} {'bytes':>10} {'bits/w':>7}",
    ]
    for row in summary["layers"]:
        shape = "x".join(map(str, row["shape"]))
        lines.append(
            f"{row['name']:<48} {shape:<20} {row['kept']:>10,d} {row['encoding']:>6} "
            f"{row['bytes']:>10,d} {row['bits_per_weight']:>7.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m popup_adapter``.

    A failure prints one ``error: ...`` line (the traceback too with ``--debug``) and exits 1.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The process exit code.
    """
    parser = argparse.ArgumentParser(prog="python -m popup_adapter")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="describe a mask artifact (folder or Hub repo)")
    inspect.add_argument("path_or_repo_id")
    inspect.add_argument("--revision", default=None)
    commands.add_parser("build-kernels", help="compile the fused CPU kernels now")
    args = parser.parse_args(argv)
    try:
        if args.command == "build-kernels":
            built = load_kernels()
            print("fused CPU kernels: " + ("built and loaded" if built else "not available"))
            return 0 if built else 1
        print(inspect_artifact(args.path_or_repo_id, args.revision))
    except Exception as error:  # the command line reports, it does not crash
        if args.debug:
            traceback.print_exc()
        unexpected = "" if isinstance(error, PopupError) else f"unexpected {type(error).__name__}: "
        hint = "" if args.debug else " (--debug shows the traceback)"
        print(f"error: {unexpected}{error}{hint if unexpected else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
