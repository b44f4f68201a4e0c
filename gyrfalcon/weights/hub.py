"""Find a checkpoint directory: a local path, or a Hugging Face hub id resolved through the standard cache.

Only data files are ever fetched (config, weights, tokenizer); nothing from a checkpoint is executed, so there
is no `trust_remote_code` anywhere in gyrfalcon: the RefinedWeb remote-code configs are read as plain JSON.
"""

from __future__ import annotations

import os
from pathlib import Path


class WeightsError(ValueError):
    """A checkpoint that cannot be found, read or matched to the model; the message names the file and keys."""


# What a model needs and nothing else: no optimizer states, no other frameworks' weights, no code.
ALLOW_PATTERNS = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "*.bin.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "generation_config.json",
]

_TRUE = {"1", "ON", "YES", "TRUE"}


def _env_cache_dir() -> str | None:
    """The hub cache directory as the environment says *now*.

    huggingface_hub reads HF_HOME / HF_HUB_CACHE into its `constants` module once, at import time, so a variable
    set later (by a test, or by a caller after importing transformers) would be silently ignored. Reading it here
    at call time, with the library's own precedence, keeps the standard variables authoritative.
    """
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        value = os.environ.get(name)
        if value:
            return os.path.expandvars(os.path.expanduser(value))
    home = os.environ.get("HF_HOME")
    if home:
        return os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub")
    return None  # the library's default (~/.cache/huggingface/hub)


def _env_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub saw it at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return value.strip().upper() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _is_hub_id(text: str) -> bool:
    """True for "org/name": exactly one slash, and nothing that only a filesystem path would start with."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and "\\" not in text and all(text.split("/"))


def resolve_model_dir(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A directory holding `config.json` and the weights of `path_or_id`.

    A local directory with a config.json is used as is. Anything else is taken as a hub id ("org/name") and
    resolved through the standard Hugging Face cache (HF_HOME / HF_HUB_CACHE), downloading only the files a
    model needs; with HF_HUB_OFFLINE=1 only the cache is consulted.
    """
    text = str(path_or_id)
    local = Path(text).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise WeightsError(f"{local} is a directory but holds no config.json, so it is not a model checkpoint")
        return local
    if local.exists():
        raise WeightsError(f"{local} is a file; expected a model directory (with config.json) or a hub id")
    if isinstance(path_or_id, Path) or not _is_hub_id(text):
        raise WeightsError(f"{text!r} does not exist locally and is not a hub id of the form 'org/name'")
    return _resolve_hub(text, revision)


def _resolve_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _env_offline()
    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")

    def fetch(patterns: list[str]) -> Path:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=_env_cache_dir(), allow_patterns=patterns, local_files_only=offline
        )
        return Path(folder)

    try:
        # Many repos (falcon-7b/40b among them) carry the weights twice, as safetensors and as pickled .bin shards.
        # Fetch without the .bin files first, and only when no safetensors weights came down ask for them, so a
        # download is never twice the model. Offline both calls just return the cached snapshot.
        path = fetch([p for p in ALLOW_PATTERNS if not p.endswith(".bin") and not p.endswith(".bin.index.json")])
        if not any(path.glob("*.safetensors")):
            path = fetch(ALLOW_PATTERNS)
    except HFValidationError as exc:
        raise WeightsError(f"{repo_id!r} is not a valid hub id: {exc}") from None
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        # Checked before the generic HTTP error these derive from: the message is the useful part.
        raise WeightsError(
            f"hub repository {where} is not accessible (it does not exist, is private, or is gated and needs a "
            f"token: run `hf auth login`): {type(exc).__name__}"
        ) from None
    except RevisionNotFoundError:
        raise WeightsError(f"hub repository {repo_id!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        if offline:
            raise WeightsError(
                f"{where} is not in the local Hugging Face cache ({_env_cache_dir() or 'default cache'}) and "
                "HF_HUB_OFFLINE is set; download it once with network access, or point to a local directory"
            ) from None
        raise WeightsError(
            f"{where} is not in the local Hugging Face cache and the hub could not be reached; check the network "
            "connection, or set HF_HUB_OFFLINE=1 to use only cached models"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any other hub/network failure becomes one clear error
        raise WeightsError(f"could not fetch {where} from the Hugging Face hub: {type(exc).__name__}: {exc}") from None

    if not (path / "config.json").is_file():
        raise WeightsError(f"hub snapshot of {where} at {path} has no config.json")
    return path
