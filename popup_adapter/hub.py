"""How an artifact travels: huggingface_hub's own API, its cache, revisions and errors.

Nothing here speaks HTTP by hand. Hub errors become [`ArtifactError`][popup_adapter.ArtifactError]
with a message that says what was missing (repo, revision, file) and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    snapshot_download,
)
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .artifact import Artifact, read_artifact
from .artifact_files import ArtifactFiles
from .artifact_schema import ARTIFACT_PATTERNS, CONFIG_NAME, is_artifact_file
from .errors import ArtifactError


def artifact_folder(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder holding the artifact.

    Args:
        path_or_repo_id: a directory (used as it is) or a Hub repo id.
        revision: a branch, tag or commit of the Hub repo.
        token: a Hub token.
        cache_dir: the Hub cache (default huggingface_hub's).
        local_files_only: use the cache alone (as ``HF_HUB_OFFLINE=1`` does).

    Returns:
        The folder: ``path_or_repo_id`` itself, or a snapshot of the repo at ``revision``.

    Raises:
        ArtifactError: no such repo, revision or cached copy, a folder with ``revision``, or a
            folder without ``popup_config.json``.
    """
    if Path(path_or_repo_id).is_dir():
        if revision is not None:
            raise ArtifactError(
                f"revision={revision!r} applies to Hub repos, but "
                f"{path_or_repo_id} is a local folder"
            )
        return Path(path_or_repo_id)
    repo_id = str(path_or_repo_id)
    at = f"{repo_id}@{revision or 'main'}"
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(ARTIFACT_PATTERNS),
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


def open_artifact(
    path_or_repo_id: str | os.PathLike, revision: str | None = None, **hub_kwargs: Any
) -> Artifact:
    """The artifact in a local folder or a Hub repo, read and checked.

    Args:
        path_or_repo_id: a folder, or a Hub repo id (downloaded into the Hub cache).
        revision: a branch, tag or commit of the Hub repo.
        **hub_kwargs: ``token``, ``cache_dir``, ``local_files_only`` for the download.

    Returns:
        The `Artifact`, its files checked against each other.

    Raises:
        ArtifactError: the folder, repo, revision or a file is missing or malformed.
    """
    return read_artifact(artifact_folder(path_or_repo_id, revision=revision, **hub_kwargs))


def push_artifact_files(
    files: ArtifactFiles,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> CommitInfo:
    """Upload an artifact's files (see ``PopupModel.artifact_files``) as one commit, creating
    the repo and the branch if needed: what ``push_to_hub`` and a training loop's main process
    (after every process gathered the masks) do. The commit also deletes the repo's earlier
    tensor file, so the revision holds one artifact, whole, before and after.

    Args:
        files: the encoded artifact.
        repo_id: the model repo.
        private: visibility of a newly created repo.
        revision: the branch (default ``main``).
        commit_message: default ``"Upload popup_adapter mask (k=...)"``.
        token: a Hub token (default: the logged-in one).

    Returns:
        huggingface_hub's ``CommitInfo``.
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    contents = files.contents()
    stale = [
        name
        for name in api.list_repo_files(repo_id, revision=revision)
        if is_artifact_file(name) and name not in contents
    ]
    k = files.meta["config"]["k"]
    return api.create_commit(
        repo_id=repo_id,
        operations=[
            *(CommitOperationAdd(name, data) for name, data in contents.items()),
            *(CommitOperationDelete(name) for name in stale),
        ],
        revision=revision,
        commit_message=commit_message or f"Upload popup_adapter mask (k={k})",
    )
