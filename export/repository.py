"""The model repository on disk: its layout, a reader and the writer's atomic-publish helpers.
numpy, pydantic and the numpy-only feature encoders only (``export.meta``): no torch, no onnx
(``onnxruntime`` is imported only by :meth:`ModelVersion.open_session` and by
``ModelVersion.verify(check_graph=True)``), so the scoring service can import this module.

Layout::

    MODELS_DIR/<name>/<version>/model.onnx        the graph (inputs cat_ids, dense; output
                                                  probability)
    MODELS_DIR/<name>/<version>/model.onnx.data   its tensors of 1 KiB or more, for a graph
                                                  stored with ONNX external data (only then;
                                                  ``external_data`` below)
    MODELS_DIR/<name>/<version>/model.json        everything needed to serve it (fields below)

A version is the folder, not one file: copy or move it whole (``shutil.copytree``, ``cp -r``).
ONNX Runtime (and ``onnx.load``) find ``model.onnx.data`` beside ``model.onnx`` by themselves,
so opening a session from the ``model.onnx`` path works for both storage forms.

Visibility rules (servers and :class:`ModelRepository` follow them):

- ``<name>`` matches ``NAME_PATTERN``: a letter or digit first, then letters, digits, ``.``,
  ``_`` or ``-``.
- ``<version>`` is a positive integer written without leading zeros (``1``, ``2``, ``10``);
  "latest" is the largest number.
- **Entries whose name starts with a dot are never models or versions.** The exporter writes a
  new version into a dot-prefixed staging folder inside ``MODELS_DIR/<name>`` (``.export-…``)
  and publishes it with one ``os.rename`` to ``<version>``, so a version folder appears complete
  or not at all. A dot folder left behind by a killed export is garbage, safe to delete when no
  export is running. Any other entry (files, other names) is ignored as well.

``model.json`` is typed in :mod:`export.meta` (``ModelMeta``: every field, format version 2,
version-1 files still load); :attr:`ModelVersion.meta` is one, parsed and checked.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> for folder in ("ctr/1", "ctr/2", "ctr/.export-12-ab", "ctr/notes"):
    ...     (root / folder).mkdir(parents=True)
    >>> repo = ModelRepository(root)
    >>> [(v.name, v.version) for v in repo.list()]
    [('ctr', 1), ('ctr', 2)]
    >>> repo.load_version("ctr").version, repo.next_version("ctr")
    (2, 3)
    >>> shutil.rmtree(root)
    >>> check_name(".hidden")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    export.repository.RepositoryError: model name '.hidden' is not valid: ...
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

from export.meta import (
    DTYPES,
    EXTERNAL_DATA_FILE,
    MODEL_FILE,
    MetaError,
    ModelMeta,
    unknown_keys,
)
from model.checks import check_sizes
from model.encoders import FeatureEncoders
from model.errors import InputError
from model.files import json_safe, sha256_file

META_FILE = "model.json"
STAGING_PREFIX = ".export-"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RepositoryError(InputError):
    """A model repository, version folder or model.json that cannot be used; names the file."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid model name (``NAME_PATTERN``); else RepositoryError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise RepositoryError(
            f"model name {name!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_version(version: int | None) -> int | None:
    """Return ``version`` if it is None or an integer >= 1, else raise RepositoryError."""
    if version is None:
        return None
    check_sizes(RepositoryError, version=version)
    return version


def parse_version(folder_name: str) -> int | None:
    """The version number a folder name stands for, or None if it is not a version folder.

    Example:
        >>> parse_version("3"), parse_version("03"), parse_version(".export-1"), parse_version("0")
        (3, None, None, None)
    """
    if not folder_name.isdigit() or not folder_name.isascii():
        return None
    number = int(folder_name)
    return number if number >= 1 and str(number) == folder_name else None


def utc_now() -> str:
    """The current UTC time as ISO 8601 with a ``Z`` suffix, to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _fail(path: Path, problem: str) -> RepositoryError:
    return RepositoryError(f"{path}: {problem}")


def external_data_entry(folder: Path) -> dict[str, Any] | None:
    """model.json's ``external_data`` for a (staged) version folder: None without a data file.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> external_data_entry(folder) is None
        True
        >>> _ = (folder / EXTERNAL_DATA_FILE).write_bytes(b"tensors")
        >>> entry = external_data_entry(folder)
        >>> entry["file"], entry["bytes"], len(entry["sha256"])
        ('model.onnx.data', 7, 64)
        >>> shutil.rmtree(folder)
    """
    path = folder / EXTERNAL_DATA_FILE
    if not path.is_file():
        return None
    return {"file": EXTERNAL_DATA_FILE, "sha256": sha256_file(path),
            "bytes": path.stat().st_size}


def validate_meta(meta: Any, where: Path) -> ModelMeta:
    """A parsed model.json (format version 1 or 2) as a checked :class:`ModelMeta`
    (``ModelMeta.parse``); RepositoryError naming ``where``, the field and the problem."""
    try:
        return ModelMeta.parse(meta)
    except MetaError as e:
        raise _fail(where, str(e)) from None


def _check_file(path: Path, size: int, digest: str, entry: str = "") -> None:
    """RepositoryError unless ``path`` exists with ``size`` bytes and SHA-256 ``digest``, the
    values of model.json's ``entry`` (its top level when empty)."""
    if not path.is_file():
        raise _fail(path, "is missing")
    source = f"{META_FILE}'s {entry}" if entry else META_FILE
    got = path.stat().st_size
    if got != size:
        raise _fail(path, f"has {got} bytes, {source} says {size}")
    got_digest = sha256_file(path)
    if got_digest != digest:
        raise _fail(path, f"sha256 {got_digest} does not match {META_FILE}'s "
                          f"{entry + ' ' if entry else ''}{digest} (the file was changed or "
                          "replaced)")


@dataclass(frozen=True)
class ModelVersion:
    """One version folder of the repository; model.json is read lazily (and cached).

    Attributes:
        name: the model name (``MODELS_DIR/<name>``).
        version: the version number (``MODELS_DIR/<name>/<version>``).
        path: the version folder.
    """

    name: str
    version: int
    path: Path

    @property
    def onnx_path(self) -> Path:
        """``<version folder>/model.onnx``."""
        return self.path / MODEL_FILE

    @property
    def external_data_path(self) -> Path | None:
        """``<version folder>/model.onnx.data`` if model.json says the graph uses it, else None."""
        entry = self.meta.external_data
        return None if entry is None else self.path / entry.file

    @property
    def meta_path(self) -> Path:
        """``<version folder>/model.json``."""
        return self.path / META_FILE

    @cached_property
    def meta(self) -> ModelMeta:
        """The parsed and checked model.json (RepositoryError if unusable)."""
        try:
            text = self.meta_path.read_text()
        except OSError as e:
            raise _fail(self.meta_path, f"cannot read: {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise _fail(self.meta_path, f"is not valid JSON: {e}") from None
        return validate_meta(data, self.meta_path)

    @property
    def encoders(self) -> FeatureEncoders:
        """The fitted feature encoders: raw request columns → (cat_ids, dense)."""
        return self.meta.feature_encoders

    def open_session(
        self, providers: tuple[str, ...] = ("CPUExecutionProvider",), options: Any = None
    ) -> Any:
        """An ``onnxruntime.InferenceSession`` on model.onnx (RepositoryError if it won't load)."""
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(self.onnx_path), sess_options=options,
                                        providers=list(providers))
        except Exception as e:  # ORT raises its own exception types
            raise _fail(self.onnx_path, f"ONNX Runtime cannot load it: {e}") from None

    def verify(self, check_graph: bool = True, session: Any = None,
               check_files: bool = True) -> ModelVersion:
        """Check that this version can be served as model.json describes it; return self.

        Checks: model.json is valid and consistent (see ``validate_meta``); model.onnx exists and
        its size and SHA-256 equal model.json's ``bytes`` and ``sha256``; so does the external
        data file where model.json's ``external_data`` names one, and where it names none there
        is no ``model.onnx.data`` in the folder; with ``check_graph``, ONNX
        Runtime loads the graph (or ``session``, one the caller already opened on it, is used)
        and its inputs and outputs (names, order, types, shapes) are those of model.json.
        ``check_files=False`` skips the sizes and hashes (a caller that checked them moments
        ago: the files of a large model are read once per load, not twice).
        Raises RepositoryError naming the file and the problem.
        """
        meta = self.meta
        if check_files:
            self._check_files(meta)
        if check_graph:
            session = session if session is not None else self.open_session()
            for key, tensors in (("inputs", session.get_inputs()),
                                 ("outputs", session.get_outputs())):
                got = [(t.name, t.type, list(t.shape)) for t in tensors]
                want = [(t.name, DTYPES[t.dtype][0], t.shape) for t in getattr(meta, key)]
                if got != want:
                    raise _fail(self.onnx_path, f"graph {key} {got} do not match {META_FILE}'s "
                                                f"{want}")
        return self

    def _check_files(self, meta: ModelMeta) -> None:
        """model.onnx and its external data file against model.json's sizes and hashes."""
        _check_file(self.onnx_path, meta.bytes, meta.sha256)
        data_path = self.external_data_path
        if data_path is None:
            stray = self.path / EXTERNAL_DATA_FILE  # ONNX Runtime would read it, unchecked
            if stray.exists():
                raise _fail(stray, f"is there but {META_FILE} has no external_data to check it "
                                   "against (the version folder was changed)")
        else:
            if not data_path.is_file():
                raise _fail(data_path, f"is missing ({META_FILE}'s external_data says the graph's "
                                       "tensors are stored there)")
            entry = meta.external_data
            assert entry is not None
            _check_file(data_path, entry.bytes, entry.sha256, "external_data")

    def summary(self) -> dict[str, Any]:
        """One row for listings: name, version, arch, precision, FLOPs, AUC, parity, created."""
        meta = self.meta
        return {
            "name": self.name,
            "version": self.version,
            "arch": meta.model.arch,
            "precision": meta.precision,
            "flops_per_example": meta.cost.flops_per_example,
            "params": meta.cost.params,
            "valid_auc": (meta.metrics.get("valid") or {}).get("auc"),
            "test_auc": (meta.metrics.get("test") or {}).get("auc"),
            "parity_max_abs_diff": meta.parity.get("max_abs_diff"),
            "created_at": meta.created_at,
        }


class ModelRepository:
    """Read access to ``MODELS_DIR`` (see the module docstring for the layout and visibility).

    Args:
        path: the repository folder, ``MODELS_DIR``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.path)!r})"

    def _require(self) -> None:
        if not self.path.is_dir():
            raise RepositoryError(f"model repository {self.path} does not exist or is not a folder")

    def names(self) -> list[str]:
        """Model names with at least one version, sorted."""
        self._require()
        return sorted(
            p.name for p in self.path.iterdir()
            if p.is_dir() and NAME_PATTERN.fullmatch(p.name) and self.versions(p.name)
        )

    def versions(self, name: str) -> list[int]:
        """Version numbers of ``name``, ascending (empty if the model does not exist)."""
        self._require()
        folder = self.path / check_name(name)
        if not folder.is_dir():
            return []
        return sorted(
            v for p in folder.iterdir() if p.is_dir() and (v := parse_version(p.name)) is not None
        )

    def next_version(self, name: str) -> int:
        """The number a new version of ``name`` gets: the largest existing one + 1 (or 1)."""
        if not self.path.is_dir():
            return 1
        return max(self.versions(name), default=0) + 1

    def list(self, name: str | None = None) -> list[ModelVersion]:
        """Every visible version (of ``name`` only, if given), sorted by name then version."""
        names = self.names() if name is None else [check_name(name)]
        return [ModelVersion(n, v, self.path / n / str(v)) for n in names for v in self.versions(n)]

    def load_version(self, name: str, version: int | None = None) -> ModelVersion:
        """Version ``version`` of ``name`` (the latest by default); RepositoryError if absent."""
        versions = self.versions(name)
        if not versions:
            raise RepositoryError(f"{self.path}: no model named {name!r} (models: {self.names()})")
        if version is None:
            version = versions[-1]
        elif check_version(version) not in versions:
            raise RepositoryError(
                f"{self.path / name}: no version {version} (versions: {versions})"
            )
        return ModelVersion(name, version, self.path / name / str(version))


@contextlib.contextmanager
def staging_dir(repo: str | Path, name: str) -> Iterator[Path]:
    """A fresh dot-prefixed folder in ``repo/name`` to write a version into.

    On an exception (or KeyboardInterrupt) the folder is removed, and so are ``repo`` and
    ``repo/name`` if this call created them and they are empty, before the exception goes on.
    Publish the folder with :func:`publish` inside the ``with`` block.
    """
    repo = Path(repo)
    model_dir = repo / check_name(name)
    created = [d for d in (repo, model_dir) if not d.exists()]
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: Path, model_dir: Path, version: int | None = None, attempts: int = 5) -> Path:
    """Make a staged version visible with one ``os.rename``; return the version folder.

    ``version`` None takes the next free number (largest + 1, chosen now; retried if another
    export takes it first). An explicit version that exists is an error. The staged files and
    the folder are fsynced first, so the version is durable once visible.
    """
    check_version(version)
    for entry in staging.iterdir():
        _fsync(entry)
    _fsync(staging)
    repo = ModelRepository(model_dir.parent)
    for _ in range(attempts):
        number = version if version is not None else repo.next_version(model_dir.name)
        final = model_dir / str(number)
        if final.exists():
            if version is not None:
                raise RepositoryError(f"{final} already exists (versions are immutable)")
            continue
        try:
            os.rename(staging, final)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and version is None:
                continue
            raise RepositoryError(f"cannot publish {staging} as {final}: {e.strerror or e}") from e
        _fsync(model_dir)
        return final
    raise RepositoryError(f"{model_dir}: could not claim a new version number in {attempts} tries")


def write_meta(path: Path, meta: ModelMeta | Mapping[str, Any]) -> ModelMeta:
    """Write model.json (strict JSON, non-finite numbers as null); a mapping is checked as
    :class:`ModelMeta` first (RepositoryError naming ``path``). Returns what was written."""
    if not isinstance(meta, ModelMeta):
        unknown = unknown_keys(meta)
        if unknown:  # a reader would drop them: a writer's mistake (a typo, a missing field)
            raise _fail(path, f"keys this model.json format does not have: {unknown}")
    typed = meta if isinstance(meta, ModelMeta) else validate_meta(json_safe(dict(meta)), path)
    path.write_text(typed.to_json())
    return typed
