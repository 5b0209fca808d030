"""Files: digests and zip archives (a ``.keras`` file is one), read and written in memory."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def zip_members(source: Path | bytes) -> dict[str, bytes]:
    """The members of a zip archive (a ``.keras`` file), from its path or its bytes."""
    with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def make_zip(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    """A zip archive holding ``members``, as bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()
