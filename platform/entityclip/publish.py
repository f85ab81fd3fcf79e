"""Atomic publication of multi-file artifacts: model checkpoints and gallery indexes.

A published artifact at `uri` (local folder or s3:// prefix) is a set of version folders and a
pointer that names the current one:

    <uri>/CURRENT              {"version": "20261201T120000-3fa9c1"}
    <uri>/20261201T120000-3fa9c1/model.safetensors, model.json, ...

`publishing(uri)` gives the writer a fresh version folder; only when every file is written does
it replace CURRENT, which is a single atomic write (a rename locally, one PUT on S3). A writer
killed at any point therefore leaves the previous version current and whole, and a reader, which
resolves CURRENT once (`current`), never sees a mix of two versions. After the switch, every
version but the new one and the one it replaced is removed: the replaced one stays for readers
that resolved it a moment before, and folders left by killed writers go. Publishers of one `uri`
must not run concurrently (each would remove the other's unfinished folder).

A folder without CURRENT (a checkpoint a user made, an MLflow artifact) is read as it is.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator

from entityclip import storage
from entityclip.errors import StorageError

POINTER = "CURRENT"


def current(uri: str) -> str:
    """The folder to read `uri` from: the version CURRENT names, or `uri` itself when it is a
    plain, unversioned folder."""
    pointer = storage.join(uri, POINTER)
    if not storage.exists(pointer):
        return uri
    version = storage.read_json(pointer).get("version")
    if not isinstance(version, str) or not version or "/" in version or version.startswith("."):
        raise StorageError(f"{pointer}: names no valid version ({version!r})")
    return storage.join(uri, version)


def require(uri: str, member: str, stage: str) -> str:
    """The current folder of `uri`, or a StorageError naming the stage that writes it, when it
    holds no `member` (e.g. the checkpoint's model.json)."""
    folder = current(uri)
    if not storage.exists(storage.join(folder, member)):
        raise StorageError(f"{uri} holds no {member}: run `entityclip {stage}` first")
    return folder


@contextlib.contextmanager
def publishing(uri: str) -> Iterator[str]:
    """Yields a new, empty version folder of `uri` to write into. On a normal exit it becomes
    current and old versions are removed; on an exception it is removed and nothing changes."""
    pointer = storage.join(uri, POINTER)
    previous = storage.read_json(pointer).get("version") if storage.exists(pointer) else None
    version = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
    folder = storage.join(uri, version)
    try:
        yield folder
    except BaseException:
        storage.delete_tree(folder)
        raise
    storage.write_json(pointer, {"version": version})  # the switch
    # Everything else goes: unfinished folders of killed writers, older versions, and the files
    # of an unversioned layout this one replaces.
    for name in storage.list_children(uri) - {POINTER, version, previous}:
        storage.delete_tree(storage.join(uri, name))
