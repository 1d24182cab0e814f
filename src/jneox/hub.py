"""Where a checkpoint comes from: a local folder, the demo model in the repository, or the Hugging Face Hub.

huggingface_hub is imported when a hub id is first resolved, not with jneox: it costs more to import
than the rest of jneox's own modules together, and most runs load a local folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError
from .files import CONFIG_FILE, SAFETENSORS, TOKENIZER_FILE

OFFICIAL_MODEL = "rinna/japanese-gpt-neox-3.6b-instruction-sft"


def default_model() -> Path | None:
    """The small demo model shipped in the repository (``models/demo``), if it is there."""
    for candidate in (Path(__file__).resolve().parents[2] / "models" / "demo",):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return None


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (or found in the cache) with huggingface_hub."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_id)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise CheckpointError(f"{s}: no such checkpoint folder (expected a folder with {CONFIG_FILE}, "
                              f"{SAFETENSORS} and {TOKENIZER_FILE}, or a hub id such as {OFFICIAL_MODEL})")
    return download(s)


def download(repo_id: str) -> Path:
    """The local folder of hub repository ``repo_id``: the cached snapshot, else downloaded (config,
    tokenizer and weights only, safetensors when the repository has them)."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    hint = (f"could not get {repo_id!r} from the Hugging Face Hub ({{why}}). Download it where there is "
            f"internet (e.g. `hf download {repo_id} --local-dir DIR`) and pass the folder: --model DIR")
    base = [CONFIG_FILE, "*.json", TOKENIZER_FILE]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=base + ["*.safetensors"], local_files_only=True))
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id!r} is not a valid hub id: {e}") from None
    except LocalEntryNotFoundError:
        pass  # not in the local cache: download it
    except OSError as e:  # a cache that cannot be read (permissions, a broken file): say so, do not guess
        raise CheckpointError(f"{repo_id!r}: the Hugging Face cache ({constants.HF_HUB_CACHE}) cannot be read: "
                              f"{type(e).__name__}: {e}") from None
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(hint.format(why="HF_HUB_OFFLINE is set and it is not in the local cache"))
    unreachable = hub_unreachable()
    if unreachable:
        raise CheckpointError(hint.format(why=f"the hub cannot be reached from this machine: {unreachable}"))
    try:
        files = HfApi().list_repo_files(repo_id)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        return Path(snapshot_download(repo_id, allow_patterns=base + weights))
    except Exception as e:  # network down, repo missing, gated: all mean the same to the user
        raise CheckpointError(hint.format(why=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")) from None


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub endpoint cannot be reached (None if it answers), asked once through huggingface_hub's
    own HTTP session (so HTTPS_PROXY and the hub's settings apply), so that an offline machine fails at
    once rather than after huggingface_hub's retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # the HTTP library's connection errors (requests' or httpx's, by version)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None
