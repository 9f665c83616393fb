"""How an artifact travels: huggingface_hub's own API, its cache, revisions and errors.

Nothing here speaks HTTP by hand. Hub errors become :class:`~popup_adapter.ArtifactError` with a
message that says what was missing (repo, revision, file) and what to do.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .artifact import ARTIFACT_FILES, CONFIG_NAME, ArtifactFiles, collect_artifact
from .errors import ArtifactError

if TYPE_CHECKING:
    from .model import PopupModel


def artifact_folder(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder holding the artifact: ``path_or_repo_id`` itself when it is a directory,
    else a snapshot of the Hub repo at ``revision`` in the Hub cache (``HF_HUB_OFFLINE=1`` and
    ``local_files_only`` use the cache alone)."""
    if Path(path_or_repo_id).is_dir():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} applies to Hub repos, but "
                f"{path_or_repo_id} is a local folder"
            )
        return Path(path_or_repo_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id = str(path_or_repo_id)
    at = f"{repo_id}@{revision or 'main'}"
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(ARTIFACT_FILES),
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        )
    except RevisionNotFoundError as error:
        raise ArtifactError(
            f"the Hub repo {repo_id!r} has no revision {revision!r}; list its "
            "branches and tags with huggingface_hub.list_repo_refs"
        ) from error
    except RepositoryNotFoundError as error:
        raise ArtifactError(
            f"{repo_id!r} is neither a local folder nor a Hub repo you can read "
            "(check the name; for a private repo pass token= or log in)"
        ) from error
    except LocalEntryNotFoundError as error:
        raise ArtifactError(
            f"{at} is not in the Hub cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE=1 or no connection); download it once online, or "
            "pass a local folder"
        ) from error
    except HFValidationError as error:
        raise ArtifactError(
            f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({error})"
        ) from error
    if not (folder / CONFIG_NAME).is_file():
        raise ArtifactError(f"{at} has no {CONFIG_NAME}: it is not a popup_adapter artifact")
    return folder


def push_artifact(
    model: PopupModel,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    adapter_name: str | None = None,
    dataset: str | None = None,
    metrics: dict[str, float] | None = None,
):
    """Upload ``model``'s artifact as one commit (creating the repo and branch if needed);
    returns huggingface_hub's ``CommitInfo``."""
    files = collect_artifact(model, adapter_name, dataset=dataset, metrics=metrics)
    return push_artifact_files(files, repo_id, private, revision, commit_message, token)


def push_artifact_files(
    files: ArtifactFiles,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
):
    """Upload collected artifact files (:func:`~popup_adapter.artifact.collect_artifact`) as
    one commit: what a training loop's main process pushes after all processes collected."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    k = files.meta["config"]["k"]
    with tempfile.TemporaryDirectory() as tmp:
        files.write(tmp)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            revision=revision,
            commit_message=commit_message or f"Upload popup_adapter mask (k={k})",
        )
