"""Find the input files: every entry an input spec matches is read, refused, or skipped by a logged rule.

fsspec's ``find`` and ``glob`` swallow a folder they cannot list (``PermissionError`` from
``os.scandir``, an S3 prefix whose listing is refused): a whole partition would vanish from the
job without a word. This module walks the input itself. Locally it lists each folder with
``os.scandir`` and looks at each entry with ``os.stat``; on S3 it lists the spec's prefix once,
recursively, with ``list_objects_v2``; every error either raises is the job's error.

The rules, as docs/inputs.md states them:

* a file named by the spec is read whatever its name; a directory is searched recursively for
  ``*.parquet``; a glob's matches (``*``, ``?``, ``[..]`` within a name, ``**`` across folders)
  must all be files;
* names starting with ``.`` or ``_`` (files and folders: temporary files, ``_SUCCESS``,
  ``_temporary/``, a state folder) are never data in a directory search, nor where a glob's
  wildcard would match them (a pattern that spells the ``.`` or ``_`` itself matches them);
  in a directory search other files not named ``*.parquet`` are not data either; S3 folder
  markers (empty keys ending in ``/``) are folders, not files. Each skip is counted and logged
  with examples;
* anything else a spec reaches that is not a regular file is an error naming it: a FIFO, socket
  or device, a folder named ``*.parquet``, a folder a glob matched, a broken symlink, a symlink
  loop (exit 3); a folder or entry that cannot be listed or looked at (exit 1).
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import posixpath
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec

from ..config import StorageSettings
from ..errors import InputDataError, StorageError, param
from ..logs import event
from .storage import full_uri, is_local, resolve, storage_error, translated

log = logging.getLogger(__name__)

GLOB_CHARS = "*?["
SKIPPED_PREFIXES = (".", "_")
DATA_SUFFIX = ".parquet"
#: Names shown in the log line that reports what a spec's search skipped.
SKIP_EXAMPLES = 5

FILE, FOLDER, OTHER = "file", "folder", "other"


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in a folder: a regular file, a folder, or something else (``what`` it is)."""

    name: str
    path: str
    kind: str
    what: str = ""
    #: A folder's (device, inode) locally, to find symlink loops; None on object stores.
    identity: tuple[int, int] | None = None


@dataclass
class Skipped:
    """What a spec's search passed over by rule, for its log line."""

    by_rule: dict[str, list[str]] = field(default_factory=dict)

    def add(self, rule: str, uri: str) -> None:
        self.by_rule.setdefault(rule, []).append(uri)

    def report(self, spec: str) -> None:
        if not self.by_rule:
            return
        parts = []
        for rule, uris in self.by_rule.items():
            examples = ", ".join(uris[:SKIP_EXAMPLES]) + (", ..." if len(uris) > SKIP_EXAMPLES else "")
            parts.append(f"{len(uris)} {rule} (e.g. {examples})")
        counts = {rule: len(uris) for rule, uris in self.by_rule.items()}
        log.info(f"input {spec}: skipped " + "; ".join(parts), extra=event("input_skipped", spec=spec, skipped=counts))


HIDDEN = "entries whose names start with '.' or '_'"
NOT_PARQUET = f"entries not named *{DATA_SUFFIX}"
MARKERS = "folder marker objects (keys ending in '/')"


def _not_regular(uri: str, what: str) -> InputDataError:
    return InputDataError(
        f"input {uri} is {what}, not a regular file; remove it from the input or change the input spec"
    )


class LocalTree:
    """A local folder tree, listed with ``os.scandir`` and looked at with ``os.stat`` (links followed)."""

    def __init__(self, fs: fsspec.AbstractFileSystem):
        self.fs = fs

    def uri(self, path: str) -> str:
        return path

    def look(self, path: str) -> Entry | None:
        """The entry at ``path`` (None when nothing, not even a broken link, is there)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if os.path.lexists(path):
                raise InputDataError(f"input {path} is a broken symlink (to {os.readlink(path)})") from None
            return None
        except OSError as exc:
            raise self._error(path, exc) from None
        name = posixpath.basename(path)
        if stat.S_ISDIR(st.st_mode):
            return Entry(name, path, FOLDER, identity=(st.st_dev, st.st_ino))
        if stat.S_ISREG(st.st_mode):
            return Entry(name, path, FILE)
        return Entry(name, path, OTHER, _kind_of(st.st_mode))

    def children(self, folder: str, skipped: Skipped, hidden: bool = False, wanted: Any = None) -> Iterator[Entry]:
        """The entries of ``folder`` whose names ``wanted`` accepts (default: all), but the
        ``.``/``_`` ones unless ``hidden``, sorted by name, each looked at as it is taken (a
        folder of 100,000 files is never 100,000 entries at once); any error raises."""
        try:
            with os.scandir(folder) as listing:
                names = sorted(entry.name for entry in listing)
        except OSError as exc:
            raise self._error(folder, exc, "list input folder") from None
        return self._entries(folder, names, skipped, hidden, wanted)

    def _entries(self, folder: str, names: list[str], skipped: Skipped, hidden: bool, wanted: Any) -> Iterator[Entry]:
        for name in names:
            path = posixpath.join(folder, name)
            if wanted is not None and not wanted(name):
                continue
            if name.startswith(SKIPPED_PREFIXES) and not hidden:
                skipped.add(HIDDEN, path)
                continue
            entry = self.look(path)
            if entry is not None:  # gone since it was listed: as if never there
                yield entry

    @staticmethod
    def _error(path: str, exc: OSError, doing: str = "look at input") -> Exception:
        if exc.errno == errno.ELOOP:
            return InputDataError(f"input {path} is a symlink loop")
        return storage_error(f"cannot {doing} {path}", exc) or StorageError(f"cannot {doing} {path}: {exc}")


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "of an unknown kind"


class ObjectTree:
    """An object store's keys under one prefix, listed once (recursively) and seen as folders.

    A refused or failed listing raises (s3fs translates AccessDenied to ``PermissionError``, a
    missing bucket to ``FileNotFoundError``). A key ending in ``/`` is a folder marker: empty, it
    makes its folder exist; with content, it is an object no path can name, and is refused.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self.fs = fs
        self.files: dict[str, int] = {}
        self.etags: dict[str, str] = {}  # as the listing gives them: what an incremental job compares
        self.folders: set[str] = set()
        self.names: dict[str, set[str]] = {}  # folder -> the names in it
        self.markers: list[str] = []
        bucket, _, key = root.strip("/").partition("/")
        self.bucket = bucket
        self._list(bucket, key + "/" if key else "")

    def _list(self, bucket: str, prefix: str) -> None:
        token: dict[str, Any] = {}
        with translated("list input", self.uri(posixpath.join(bucket, prefix)), passthrough=(FileNotFoundError,)):
            while True:
                page = self.fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, **token)
                for item in page.get("Contents", []):
                    self._add(item["Key"], int(item.get("Size", 0)))
                    if item.get("ETag") and not item["Key"].endswith("/"):
                        self.etags[f"{bucket}/{item['Key']}"] = str(item["ETag"])
                if not page.get("IsTruncated"):
                    break
                token = {"ContinuationToken": page["NextContinuationToken"]}
        self.folders.add(bucket)

    def _add(self, key: str, size: int) -> None:
        path = f"{self.bucket}/{key}"
        if key.endswith("/"):
            if size:
                raise InputDataError(
                    f"input {self.uri(path)} is an object whose key ends in '/' and that holds "
                    f"{size} bytes: no path can name it as a file"
                )
            self.markers.append(self.uri(path))
            path = path.rstrip("/")
        else:
            self.files[path] = size
        child, parent = path, posixpath.dirname(path)
        while parent:
            self.names.setdefault(parent, set()).add(posixpath.basename(child))
            if parent in self.folders:
                break
            self.folders.add(parent)
            child, parent = parent, posixpath.dirname(parent)
        if key.endswith("/"):
            self.folders.add(path)

    def uri(self, path: str) -> str:
        return full_uri(self.fs, path)

    def look(self, path: str) -> Entry | None:
        path = path.rstrip("/")
        name = posixpath.basename(path)
        if path in self.files and path in self.folders:
            raise InputDataError(
                f"input {self.uri(path)} is both an object and a folder (keys below it); it cannot be read as one file"
            )
        if path in self.files:
            return Entry(name, path, FILE)
        if path in self.folders:
            return Entry(name, path, FOLDER)
        return None

    def children(self, folder: str, skipped: Skipped, hidden: bool = False, wanted: Any = None) -> list[Entry]:
        folder = folder.rstrip("/")
        entries = []
        for name in sorted(self.names.get(folder, ())):
            path = f"{folder}/{name}"
            if wanted is not None and not wanted(name):
                continue
            if name.startswith(SKIPPED_PREFIXES) and not hidden:
                skipped.add(HIDDEN, self.uri(path))
                continue
            entry = self.look(path)
            if entry is not None:
                entries.append(entry)
        return entries


def _search(tree: Any, top: Entry, skipped: Skipped) -> Iterator[str]:
    """Every data file below the folder ``top``, in name order, refusing what is not a file."""
    stack: list[tuple[Entry, frozenset[tuple[int, int]]]] = [(top, frozenset([top.identity] if top.identity else []))]
    while stack:
        folder, ancestors = stack.pop()
        below = []
        for entry in tree.children(folder.path, skipped):
            if entry.kind == FOLDER:
                if entry.name.endswith(DATA_SUFFIX):
                    raise _not_regular(tree.uri(entry.path), "a folder")
                if entry.identity is not None and entry.identity in ancestors:
                    raise InputDataError(f"input {tree.uri(entry.path)} is a symlink loop (a folder that holds itself)")
                below.append((entry, ancestors | ({entry.identity} if entry.identity else set())))
            elif not entry.name.endswith(DATA_SUFFIX):
                skipped.add(NOT_PARQUET, tree.uri(entry.path))
            elif entry.kind == FILE:
                yield entry.path
            else:
                raise _not_regular(tree.uri(entry.path), entry.what)
        stack.extend(reversed(below))


def _glob(
    tree: Any, base: str, parts: Sequence[str], skipped: Skipped, ancestors: frozenset[tuple[int, int]] | None = None
) -> Iterator[Entry]:
    """Entries matching ``parts`` below ``base``, component by component (``**``: any depth,
    refusing a folder that holds itself; ``ancestors`` are the folders ``**`` went through)."""
    if not parts:
        entry = tree.look(base)
        if entry is not None:
            yield entry
        return
    head, tail = parts[0], parts[1:]
    if not any(ch in head for ch in GLOB_CHARS):
        path = posixpath.join(base, head)
        if tail:
            entry = tree.look(path)
            if entry is not None and entry.kind == FOLDER:
                yield from _glob(tree, path, tail, skipped)
        else:
            entry = tree.look(path)
            if entry is not None:
                yield entry
        return
    if head == "**":
        if ancestors is None:
            top = tree.look(base)
            ancestors = frozenset([top.identity] if top is not None and top.identity else [])
        if tail:
            yield from _glob(tree, base, tail, skipped)
        for entry in tree.children(base, skipped):
            if entry.kind == FOLDER:
                if entry.identity is not None and entry.identity in ancestors:
                    raise InputDataError(f"input {tree.uri(entry.path)} is a symlink loop (a folder that holds itself)")
                below = ancestors | ({entry.identity} if entry.identity else set())
                yield from _glob(tree, entry.path, parts, skipped, below)
            elif not tail:
                yield entry
        return
    matching = lambda name: fnmatch.fnmatchcase(name, head)  # noqa: E731
    for entry in tree.children(base, skipped, hidden=head.startswith(SKIPPED_PREFIXES), wanted=matching):
        if tail:
            if entry.kind == FOLDER:
                yield from _glob(tree, entry.path, tail, skipped)
        else:
            yield entry


def _tree(fs: fsspec.AbstractFileSystem, root: str) -> Any:
    if is_local(fs):
        return LocalTree(fs)
    if not hasattr(fs, "call_s3"):
        raise StorageError(f"cannot list input {full_uri(fs, root)}: only local paths and s3:// are supported")
    return ObjectTree(fs, root)


def _remote_file(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether ``path`` is an object, by one HEAD (which needs no permission to list the bucket)."""
    bucket, _, key = path.partition("/")
    if not key or path.endswith("/"):
        return False
    try:
        fs.call_s3("head_object", Bucket=bucket, Key=key)
        return True
    except (FileNotFoundError, PermissionError):  # PermissionError: missing, without ListBucket
        return False


def _matches(
    spec: str, fs: fsspec.AbstractFileSystem, path: str, skipped: Skipped, seen: dict[str, Any] | None = None
) -> list[str]:
    """The paths ``spec`` stands for, each a regular file; errors for everything else. ``seen``
    (on S3) gets each listed object's size and ETag, by path."""
    if any(ch in path for ch in GLOB_CHARS):
        parts = path.split("/")
        fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in GLOB_CHARS))
        base = "/".join(parts[:fixed]) or "/"
        tree = _tree(fs, base)
        found = []
        for entry in _glob(tree, base, parts[fixed:], skipped):
            if entry.kind == FOLDER:
                raise InputDataError(
                    f"input glob {spec} matched {tree.uri(entry.path)}, which is a folder; "
                    f"a glob must match only files (e.g. end it in *{DATA_SUFFIX})"
                )
            if entry.kind != FILE:
                raise _not_regular(tree.uri(entry.path), entry.what)
            found.append(entry.path)
        if isinstance(tree, ObjectTree):
            _seen(tree, found, seen)
            for marker in tree.markers:
                skipped.add(MARKERS, marker)
        return sorted(set(found))
    if not is_local(fs) and _remote_file(fs, path):
        return [path]
    tree = _tree(fs, path)
    entry = tree.look(path)
    if entry is None:
        raise InputDataError(f"input not found: {spec}")
    if entry.kind == FILE:
        return [entry.path]
    if entry.kind != FOLDER:
        raise _not_regular(tree.uri(entry.path), entry.what)
    found = sorted(_search(tree, entry, skipped))
    if isinstance(tree, ObjectTree):
        _seen(tree, found, seen)
        for marker in tree.markers:
            skipped.add(MARKERS, marker)
    return found


def _seen(tree: ObjectTree, paths: Sequence[str], seen: dict[str, Any] | None) -> None:
    if seen is not None:
        for path in paths:
            seen[path] = {"size": tree.files[path], **({"etag": tree.etags[path]} if path in tree.etags else {})}


def listed_identities(
    specs: Sequence[str], storage: StorageSettings | None = None
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """``list_inputs``'s URIs and each file's identity as known without opening it: size and ETag
    from the S3 listing itself (a file named alone: one HEAD), size, mtime and inode from a local
    ``stat``. What an incremental job compares with what it scored before; no data is read."""
    seen: dict[str, Any] = {}
    uris = list_inputs(specs, storage, seen)
    found: dict[str, dict[str, Any]] = {}
    for uri in uris:
        where = resolve(uri, storage)
        if is_local(where.fs):
            with translated("look at input", uri):
                status = os.stat(where.path)
            found[uri] = {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "inode": status.st_ino}
        elif where.path in seen:
            found[uri] = seen[where.path]
        else:  # named alone: one HEAD
            bucket, _, key = where.path.partition("/")
            with translated("look at input", uri):
                head = where.fs.call_s3("head_object", Bucket=bucket, Key=key)
            found[uri] = {"size": int(head["ContentLength"]), "etag": str(head["ETag"])}
    return uris, found


def list_inputs(
    specs: Sequence[str], storage: StorageSettings | None = None, seen: dict[str, Any] | None = None
) -> list[str]:
    """Expand files, directories (recursively) and globs into a deterministic list of URIs.

    Each spec's matches are sorted; specs keep the order given; a file named twice is read once.
    ``seen``: see ``_matches``.
    """
    if not specs:
        raise InputDataError(f"no input given: give {param('input')} (YAML key 'input')")
    found: list[str] = []
    for spec in specs:
        where = resolve(spec, storage)
        fs, path = where.fs, where.path
        skipped = Skipped()
        with translated("list input", spec, passthrough=(FileNotFoundError,)):
            try:
                matches = _matches(spec, fs, path, skipped, seen)
            except FileNotFoundError:  # a missing bucket
                raise InputDataError(f"input not found: {spec}") from None
        skipped.report(spec)
        if not matches:
            raise InputDataError(f"no Parquet file matched input {spec}")
        found.extend(full_uri(fs, p) for p in matches)
    return list(dict.fromkeys(found))
