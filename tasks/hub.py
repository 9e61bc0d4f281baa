"""Where a hub name's or folder's files come from: a folder, a folder per revision, the local
HF cache, or (only when reachable) the hub; unknown names fail at once, not after retries.

A name may carry a revision, `NAME@REVISION` (a hub branch, tag or commit such as Pythia's
`step1000`, or the subfolder of that name of a folder): the spec's `revisions:` list expands
to such names. HF's own loader spends 30-60 s in network retries before saying a name is
unknown when the hub cannot be reached; `resolve` answers from the file system, and probes
the hub with one bounded TCP connection only when the name is not cached and the hub is
not declared offline.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tasks.errors import InvalidInput
from tasks.known_models import ALIASES, TINY_FAMILIES

# One TCP connect, DNS included, to decide that the hub is unreachable.
REACH_TIMEOUT_S = 1.0
ALLOWED = (f"an alias ({', '.join(ALIASES)}), tiny:<family> (one of {', '.join(TINY_FAMILIES)}), "
           "shape:<name>, a local model folder, a .gguf file, or a hub name in the local HF "
           "cache, optionally NAME@REVISION")


@dataclass(frozen=True)
class Source:
    """What to hand to from_pretrained, whether it may touch the network, and the identity."""

    location: str  # a folder, or a hub repo id
    revision: str | None  # hub revision (branch, tag or commit); None for folders
    cache_dir: str | None
    local_only: bool
    folder: Path | None  # set when the files are a local folder
    commit: str | None = None  # the cached snapshot's commit hash (hub names)


# Files any tokenizer is saved with; without one of them transformers builds an empty tokenizer
# of the model type (a vocabulary of 2), which would leave prompts nothing to draw from.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(src: Source) -> bool:
    """Whether the checkpoint ships tokenizer files (random-init checkpoints often do not)."""
    if src.folder is not None:
        return any((src.folder / f).is_file() for f in _TOKENIZER_FILES)
    if not src.local_only:
        return True  # a download: the hub decides
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(src.location, f, cache_dir=src.cache_dir,
                                                 revision=src.revision), str)
               for f in _TOKENIZER_FILES)


def split_revision(name: str) -> tuple[str, str | None]:
    """(name, revision) of `NAME@REVISION`; an existing path is a name whatever it holds."""
    if "@" not in name or Path(name).exists():
        return name, None
    base, revision = name.rsplit("@", 1)
    if not base or not revision or "/" in revision:
        raise InvalidInput("model", "NAME or NAME@REVISION (a hub branch, tag or commit, or a "
                           "subfolder of a model folder)", name)
    return base, revision


def identity(name: str, src: Source, revision: str | None) -> dict[str, str]:
    """What goes into unit keys: the name, the snapshot's commit (hub) or the sha256 of the
    folder's config.json, and the revision asked for, when one was."""
    if src.folder is not None:
        h = hashlib.sha256((src.folder / "config.json").read_bytes()).hexdigest()[:16]
    else:
        h = src.commit or "remote"
    ident = {"name": name, "revision": h}
    if revision is not None:
        ident["revision_name"] = revision
    return ident


def hub_cache_dir() -> str:
    """HF_HUB_CACHE as the environment says now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return str(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = REACH_TIMEOUT_S) -> bool:
    """Whether the hub endpoint accepts a TCP connection within `timeout` seconds.

    The connect runs in a daemon thread so that a slow DNS lookup cannot hold us longer.
    """
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    answer: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def _cached_commit(repo_id: str, revision: str | None, cache_dir: str) -> str | None:
    """The commit of the cached snapshot holding config.json for (repo, revision), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir,
                                       revision=revision)
    except ValueError:  # not a valid repo id (HFValidationError is a ValueError)
        return None
    # <cache>/models--org--name/snapshots/<commit>/config.json
    return Path(found).parent.name if isinstance(found, str) else None


def resolve(name: str, revision: str | None = None) -> Source:
    """Where the model `name` (at `revision`) is, or InvalidInput naming `model` at once.

    A folder with a revision means the subfolder of that name (one folder per checkpoint).
    """
    path = Path(name)
    if path.is_dir():
        folder = path / revision if revision else path
        if not (folder / "config.json").is_file():
            want = f"a subfolder {revision!r} holding config.json" if revision else "config.json"
            raise InvalidInput("model", f"a model folder with {want}", name if not revision
                               else f"{name} (revision {revision})")
        return Source(str(folder), None, None, True, folder)
    if path.exists():
        raise InvalidInput("model", ALLOWED, name, detail="a file that is not a .gguf")
    cache = hub_cache_dir()
    commit = _cached_commit(name, revision, cache)
    if commit is not None:
        return Source(name, revision, cache, True, None, commit)
    at = f" at revision {revision!r}" if revision else ""
    if hub_offline():
        raise InvalidInput("model", ALLOWED, name, detail=f"not in the local HF cache ({cache}){at} "
                           "and HF_HUB_OFFLINE is set")
    if not hub_reachable():
        raise InvalidInput("model", ALLOWED, name, detail=f"not in the local HF cache ({cache}){at} "
                           "and the hub is unreachable")
    return Source(name, revision, cache, False, None)
