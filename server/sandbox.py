"""Resolve a caller's slide reference under the configured slide root.

The slide root is the hospital share the server may read. A reference is a relative
path with "/" separators. Absolute paths, ``..`` components, empty paths and NUL
bytes are refused as malformed (INVALID_ARGUMENT) before the filesystem is touched;
a path that resolves outside the root (through a symlink) is refused with
PERMISSION_DENIED before its existence is checked, so nothing outside the root is
revealed. Error messages never echo the path.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from histohelper.errors import SlideNotFoundError, SlidePathDeniedError, SlidePathError

MAX_REFERENCE_CHARS = 4096
#: Longest path component, in UTF-8 bytes (NAME_MAX of Linux and macOS file systems).
MAX_COMPONENT_BYTES = 255


def resolve_slide_path(root: Path, reference: str) -> Path:
    """Map ``reference`` to a real file under ``root``.

    Args:
        root: the slide root directory.
        reference: caller-supplied relative path, e.g. ``"cohort1/slide7.svs"``.

    Returns:
        The fully resolved path of an existing regular file inside ``root``.

    Raises:
        SlidePathError: empty, too long (or a component over
            :data:`MAX_COMPONENT_BYTES`), absolute, NUL byte, backslash-absolute,
            ``..``, or a name the file system refuses.
        SlidePathDeniedError: resolves outside ``root`` (e.g. through a symlink).
        SlideNotFoundError: nothing (or no regular file) at that path.
    """
    if not reference:
        raise SlidePathError("slide path must be a non-empty relative path")
    if len(reference) > MAX_REFERENCE_CHARS:
        raise SlidePathError(f"slide path is longer than {MAX_REFERENCE_CHARS} characters")
    if "\x00" in reference:
        raise SlidePathError("slide path contains a NUL byte")
    normalised = reference.replace("\\", "/")
    pure = PurePosixPath(normalised)
    if pure.is_absolute() or (len(normalised) > 1 and normalised[1] == ":"):
        raise SlidePathError("slide path must be relative to the slide root")
    if any(part == ".." for part in pure.parts):
        raise SlidePathError("slide path must not contain '..'")
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES for part in pure.parts):
        raise SlidePathError(f"a slide path component is longer than {MAX_COMPONENT_BYTES} bytes")
    real_root = root.resolve(strict=True)
    try:
        candidate = (real_root / Path(*pure.parts)).resolve(strict=False)
        if not candidate.is_relative_to(real_root):
            raise SlidePathDeniedError("slide path leads outside the slide root")
        is_file = candidate.is_file()
    except PermissionError:  # a directory on the way is not searchable
        raise SlidePathDeniedError("the slide is not readable by the server") from None
    except (OSError, RuntimeError, ValueError, UnicodeError):  # ENAMETOOLONG, symlink loop
        raise SlidePathError("the file system refused the slide path") from None
    if not is_file:
        raise SlideNotFoundError("no slide at that path under the slide root")
    if not os.access(candidate, os.R_OK):
        raise SlidePathDeniedError("the slide is not readable by the server")
    return candidate
