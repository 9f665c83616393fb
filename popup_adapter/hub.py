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

from .artifact import Artifact, collection_files, is_collection, read_artifact, read_collection
from .artifact_files import ArtifactFiles, CollectionFiles
from .artifact_schema import (
    ARTIFACT_PATTERNS,
    CARD_NAME,
    COLLECTION_NAME,
    CONFIG_NAME,
    is_artifact_file,
)
from .errors import ArtifactError


def _is_local(path_or_repo_id: str | os.PathLike, revision: str | None) -> bool:
    if not Path(path_or_repo_id).is_dir():
        return False
    if revision is not None:
        raise ArtifactError(
            f"revision={revision!r} applies to Hub repos, but {path_or_repo_id} is a local folder"
        )
    return True


def _snapshot(
    repo_id: str,
    revision: str | None,
    patterns: list[str],
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """The files of ``repo_id`` at ``revision`` that match ``patterns``, in the Hub cache
    (the folder is named by the commit: a second call at that commit reads the same version).
    """
    at = f"{repo_id}@{revision or 'main'}"
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=patterns,
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
            folder without ``popup_config.json`` (a collection's is named).
    """
    local = _is_local(path_or_repo_id, revision)
    if local:
        folder, at = Path(path_or_repo_id), str(path_or_repo_id)
    else:
        hub = {"token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
        folder = _snapshot(str(path_or_repo_id), revision, list(ARTIFACT_PATTERNS), **hub)
        at = f"{path_or_repo_id}@{revision or 'main'}"
    if not (folder / CONFIG_NAME).is_file() and is_collection(folder):
        raise ArtifactError(
            f"{at} is a collection of masks, not one: load them with "
            "PopupModel.from_pretrained(path, adapters=[...]), or one with "
            "model.load_adapter(path, name)"
        )
    if not (folder / CONFIG_NAME).is_file() and not local:  # a folder: read_artifact says
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


def open_masks(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    adapters: list[str] | None = None,
    any_artifact: bool = False,
    **hub_kwargs: Any,
) -> list[Artifact]:
    """The masks a folder or Hub repo holds: its artifact, or the members of its collection
    named by ``adapters`` (only their tensor files are downloaded and read).

    Args:
        path_or_repo_id: a folder, or a Hub repo id.
        revision: a branch, tag or commit of the Hub repo.
        adapters: a collection's members to open (default: all); a single artifact takes
            none.
        any_artifact: a single artifact is opened whatever ``adapters`` names
            (``load_adapter``: a collection's member of that name, or the artifact).
        **hub_kwargs: ``token``, ``cache_dir``, ``local_files_only`` for the download.

    Returns:
        The artifacts, each checked (a collection's members carry their names in
        ``Artifact.member``).

    Raises:
        ArtifactError: missing or malformed files, an adapter the collection lacks, or
            ``adapters`` for a single artifact.
    """
    if _is_local(path_or_repo_id, revision):
        folder = Path(path_or_repo_id)
    else:  # the small files first, then what they name, at the same commit
        patterns = [CONFIG_NAME, COLLECTION_NAME, CARD_NAME]
        folder = _snapshot(str(path_or_repo_id), revision, patterns, **hub_kwargs)
        if is_collection(folder):
            files = collection_files(folder, adapters)
            _snapshot(str(path_or_repo_id), folder.name, files, **hub_kwargs)
    if is_collection(folder):
        return list(read_collection(folder, adapters).values())
    if adapters is not None and not any_artifact:
        raise ArtifactError(
            f"{path_or_repo_id} holds one mask, not a collection: load it without adapters="
        )
    return [open_artifact(path_or_repo_id, revision, **hub_kwargs)]


def push_artifact_files(
    files: ArtifactFiles | CollectionFiles,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> CommitInfo:
    """Upload an artifact's or a collection's files (see ``PopupModel.artifact_files``) as one
    commit, creating the repo and the branch if needed: what ``push_to_hub`` and a training
    loop's main process (after every process gathered the masks) do. The commit also deletes
    the repo's earlier tensor files (and the other kind's commit file), so the revision holds
    one artifact or collection, whole, before and after.

    Args:
        files: the encoded artifact or collection.
        repo_id: the model repo.
        private: visibility of a newly created repo.
        revision: the branch (default ``main``).
        commit_message: default ``"Upload popup_adapter mask (k=...)"`` (a collection:
            ``"... collection (n masks)"``).
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
    return api.create_commit(
        repo_id=repo_id,
        operations=[
            *(CommitOperationAdd(name, data) for name, data in contents.items()),
            *(CommitOperationDelete(name) for name in stale),
        ],
        revision=revision,
        commit_message=commit_message or files.commit_message,
    )
