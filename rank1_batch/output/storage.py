"""Files behind fsspec URLs: input listing, Parquet footers, and part files written once."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import RunConfig
from ..schema import InputError, conform
from .parallel_reads import READERS, in_parallel

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
# The footer key under which a part file carries what it commits (see `Output.write_table`).
RECORD_KEY = "rank1_batch.commit"
# A part file up to this size (a batch's is tens of kilobytes) is read whole, in one request.
WHOLE_READ_BYTES = 8 * 2**20
# Keys asked for per page of an S3 listing (S3's own most).
LISTING_PAGE_KEYS = 1000
# The version of a file that does not exist, for a write that must create it (see `Output.write_bytes_if`).
ABSENT = ""
# What S3 answers when a conditional request finds the object otherwise (the second: two at once).
_CONDITION_FAILED = ("PreconditionFailed", "ConditionalRequestConflict")


class Changed(OSError):
    """A conditional write or removal found the file other than it expected: another writer was there."""


def storage_options(url: str, run: RunConfig) -> dict[str, Any]:
    """Options for the URL's filesystem. Credentials are never passed here: s3fs takes them from
    the standard AWS environment variables, config files and instance roles."""
    if fsspec.utils.get_protocol(url) not in ("s3", "s3a"):
        return {}
    # botocore's pool holds 10 connections by default: fewer than the files a process reads at once
    options: dict[str, Any] = {"config_kwargs": {"max_pool_connections": READERS}}
    if run.s3_endpoint_url:
        options["endpoint_url"] = run.s3_endpoint_url
    if run.s3_profile:
        options["profile"] = run.s3_profile
    return options


def filesystem(url: str, run: RunConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url, **storage_options(url, run))


def _is_hidden(path: str) -> bool:
    return path.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_"))


def is_part_file(path: str) -> bool:
    """A committed Parquet file: not a marker, nor a file still being written under a hidden name."""
    return path.endswith(".parquet") and not _is_hidden(path)


def list_input_files(run: RunConfig) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Every Parquet file named by the inputs (files, directories, globs), in a stable order."""
    if not run.input:
        raise ValueError("--input: give at least one Parquet file, directory or glob")
    found: list[str] = []
    fs = None
    for url in run.input:
        url_fs, path = filesystem(url, run)
        if fs is not None and url_fs.protocol != fs.protocol:
            raise ValueError(f"--input {url}: all inputs must be on one filesystem")
        fs = url_fs
        if fsspec.core.has_magic(path):
            matches = fs.glob(path)
        elif fs.isdir(path):
            matches = [p for p in fs.find(path) if p.endswith(PARQUET_SUFFIXES)]
        elif fs.exists(path):
            matches = [path]
        else:
            raise FileNotFoundError(f"--input {url}: no such file or directory")
        matches = [p for p in matches if not _is_hidden(p)]
        if not matches:
            raise FileNotFoundError(f"--input {url}: no Parquet files found")
        found.extend(sorted(matches))
    return fs, list(dict.fromkeys(found))


def arrow_filesystem(fs: fsspec.AbstractFileSystem):
    """An fsspec filesystem as pyarrow (and so Ray Data) takes it."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as the user would write it (with its protocol), for messages."""
    return fs.unstrip_protocol(path)


@dataclass(frozen=True)
class Shard:
    path: str
    schema: pa.Schema
    rows: int

    @property
    def columns(self) -> list[str]:
        return self.schema.names


def read_footer(fs: fsspec.AbstractFileSystem, path: str) -> Shard:
    """Column names and row count from a Parquet file's footer; a clear error if it is not one."""
    try:
        with fs.open(path, "rb") as handle:
            metadata = pq.ParquetFile(handle).metadata
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"{url_of(fs, path)}: not a readable Parquet file ({error})") from None
    return Shard(path, metadata.schema.to_arrow_schema(), metadata.num_rows)


@dataclass(frozen=True)
class Part:
    """A committed part file as read: the columns asked for, its rows, and the record it carries."""

    table: pa.Table | None
    rows: int
    record: dict | None


def record_of(parquet: pq.ParquetFile) -> dict | None:
    """The record a part file carries in its footer (see `Output.write_table`), if any."""
    written = (parquet.schema_arrow.metadata or {}).get(RECORD_KEY.encode())
    return None if written is None else json.loads(written)


def staging_name(name: str) -> str:
    """The hidden name a file is written under on a filesystem without atomic uploads."""
    return f".{name}.tmp"


def content_name(*keys: pa.Array) -> str:
    """A file name that depends only on the rows it holds, so a retried batch rewrites its own file."""
    digest = hashlib.sha256()
    for key in keys:
        for value in key.to_pylist():
            digest.update(str(value).encode("utf-8", "surrogatepass") + b"\0")
    return f"part-{digest.hexdigest()[:32]}.parquet"


# Listings of an output's directories: each committed part file's size in bytes, by path.
Listings = dict[str, dict[str, int]]


class Output:
    """The output URL: part files under sub-directories, and small files at the top."""

    def __init__(self, url: str, run: RunConfig):
        self.url = url.rstrip("/")
        self.run = run
        self.fs, self.root = filesystem(self.url, run)

    def __reduce__(self):
        return Output, (self.url, self.run)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def write_table(self, directory: str, name: str, table: pa.Table, row_group_size: int | None = None,
                    record: dict | None = None) -> None:
        """Write one Parquet file so that readers never see it half-written, with `record` (what
        the file commits, as JSON) in its footer when given.

        An object store shows an object only once its upload completes; on other filesystems the
        file is written under a hidden name and renamed.
        """
        if record is not None:
            table = table.replace_schema_metadata({RECORD_KEY: json.dumps(record, sort_keys=True)})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=row_group_size)
        self.write_bytes(f"{directory}/{name}", buffer.getvalue())

    def write_bytes(self, relative: str, data: bytes) -> None:
        if self.is_local:
            with self.writing(relative) as handle:
                handle.write(data)
        else:
            self.fs.pipe_file(self.path(relative), data)

    @property
    def is_local(self) -> bool:
        return "file" in self.fs.protocol

    @contextlib.contextmanager
    def writing(self, relative: str):
        """A file to write in pieces, which readers see only once it is whole: on a local
        filesystem written under a hidden name and renamed; for an object store, gathered in a
        local temporary file and uploaded (an object is visible once its upload completes; its
        key needs no directory, so none is made: a request saved on every commit)."""
        target = self.path(relative)
        if self.is_local:
            directory, name = target.rsplit("/", 1)
            self.fs.makedirs(directory, exist_ok=True)
            staging = f"{directory}/{staging_name(name)}"
            with self.fs.open(staging, "wb") as handle:
                yield handle
            self.fs.mv(staging, target)
        else:
            with tempfile.NamedTemporaryFile(prefix="rank1-batch-") as handle:
                yield handle
                handle.flush()
                self.fs.put_file(handle.name, target)

    def files(self, directory: str) -> list[str]:
        return list(self.listing(directory))

    def listing(self, directory: str) -> dict[str, int]:
        """The committed part files of a directory and their sizes in bytes, by path in name
        order, listed now: other processes (the engine actors) write there, so a listing this
        process cached earlier may lack their files.

        A large run's directory holds tens of thousands of files, and fsspec's listing keeps a
        dict of a dozen details for each (s3fs caches them all as well), several times what
        this keeps: so local disk and S3 are listed here, page by page, for paths and sizes."""
        base = self.path(directory)
        if self.is_local:
            listed = _local_files(base)
        elif self.is_s3:
            listed = self._s3_files(base)
        else:
            self.fs.invalidate_cache(base)
            listed = ((path, info["size"]) for path, info in self.fs.find(base, detail=True).items())
        return dict(sorted((path, size) for path, size in listed if is_part_file(path)))

    def _s3_files(self, base: str) -> Iterator[tuple[str, int]]:
        """Each file under `base` on S3 and its size, a page of the listing at a time."""
        bucket, key, _ = self.fs.split_path(base)
        request = {"Bucket": bucket, "Prefix": f"{key}/", "MaxKeys": LISTING_PAGE_KEYS}
        while True:
            page = self.fs.call_s3("list_objects_v2", **request)
            for item in page.get("Contents", []):
                yield f"{bucket}/{item['Key']}", item["Size"]
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    def listings(self, *directories: str) -> Listings:
        """`listing` of each directory, listed at once."""
        return dict(zip(directories, in_parallel(self.listing, list(directories))))

    def sizes(self, directory: str) -> dict[str, int]:
        """Each committed part file's name and size in bytes, from one listing."""
        return {path.rsplit("/", 1)[-1]: size for path, size in self.listing(directory).items()}

    def open_part(self, path: str, size: int):
        """A part file to read, its size known from a listing. One of a batch is fetched whole,
        in one request: an object store's file handle asks for the object's details before each
        ranged read, and s3fs's whole-object read asks for its size first, unless given a range."""
        if size <= WHOLE_READ_BYTES:
            return pa.BufferReader(self.fs.cat_file(path, start=0, end=size))
        return self.fs.open(path, "rb", size=size)

    def read(self, directory: str, columns: list[str], schema: pa.Schema,
             listed: dict[str, int] | None = None) -> pa.Table:
        """All committed part files of a directory as one table (empty with `schema` if none):
        those of `listed`, its listing when the caller has one, else of a listing now. Files are
        read many at a time: on object storage each costs round trips, not bandwidth."""
        files = self.listing(directory) if listed is None else listed
        parts = in_parallel(lambda file: self.read_part(*file, columns, schema), list(files.items()))
        return pa.concat_tables([pa.schema([schema.field(name) for name in columns]).empty_table(),
                                 *(part.table for part in parts)])

    def read_part(self, path: str, size: int, columns: list[str], schema: pa.Schema,
                  without_record: list[str] = ()) -> Part:
        """One committed part file of `size` bytes: the `columns` given (none reads the footer
        alone), with `without_record` as well if the file carries no record."""
        with self.open_part(path, size) as handle:
            parquet = pq.ParquetFile(handle)
            written = record_of(parquet)
            wanted = [*columns, *(without_record if written is None else ())]
            # a column added to the layout later is null in files written before it
            present = [name for name in wanted if name in parquet.schema_arrow.names]
            # Arrow's own threads on a Python file object can outlive the read and abort the process at exit
            table = parquet.read(columns=present, use_threads=False) if wanted else None
        table = None if table is None else conform(table, pa.schema([schema.field(name) for name in wanted]))
        return Part(table, parquet.metadata.num_rows, written)

    @property
    def is_s3(self) -> bool:
        """S3, or a store that speaks its API."""
        return "s3" in self.fs.protocol

    @property
    def checks_versions(self) -> bool:
        """Whether the store itself can make a write conditional on a file's version (S3 does:
        If-None-Match and If-Match)."""
        return self.is_s3

    def version(self, relative: str) -> str | None:
        """What a conditional write of this file is checked against: its ETag on S3, `ABSENT`
        when there is none (on S3 or a local filesystem); None where the store cannot check (a
        local file that exists, any file of another store)."""
        target = self.path(relative)
        self.fs.invalidate_cache(target)
        if self.checks_versions:
            try:
                return self.fs.info(target)["ETag"]
            except FileNotFoundError:
                return ABSENT
        return ABSENT if self.is_local and not self.fs.exists(target) else None

    def write_bytes_if(self, relative: str, data: bytes, version: str | None) -> str | None:
        """Write a small file only if it is still at `version` (`ABSENT`: only if there is none),
        else raise `Changed`; return its new version. S3 checks either condition itself, a local
        filesystem checks `ABSENT` (a hard link fails on an existing name); with `version` None
        nothing can be checked and the file is written as by `write_bytes`."""
        target = self.path(relative)
        if version is None:
            self.write_bytes(relative, data)
            return None
        if self.is_local:  # `ABSENT` (see `version`)
            self._create_local(target, data)
            return None
        condition = {"IfNoneMatch": "*"} if version == ABSENT else {"IfMatch": version}
        try:
            return self.fs.pipe_file(target, data, **condition)["ETag"]
        except OSError as error:
            if isinstance(error, FileExistsError) or _failed_condition(error):
                raise Changed(f"{url_of(self.fs, target)} was changed by another writer") from None
            raise

    def _create_local(self, target: str, data: bytes) -> None:
        directory, name = target.rsplit("/", 1)
        self.fs.makedirs(directory, exist_ok=True)
        staging = f"{directory}/{staging_name(name)}.{uuid.uuid4().hex}"  # one per writer
        with open(staging, "wb") as handle:
            handle.write(data)
        try:
            os.link(staging, target)
        except FileExistsError:
            raise Changed(f"{target} was created by another writer") from None
        finally:
            os.unlink(staging)

    def remove_if(self, relative: str, version: str) -> None:
        """Remove a file only if it is still at `version` (S3 checks it), else raise `Changed`."""
        bucket, key, _ = self.fs.split_path(self.path(relative))
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except OSError as error:
            if _failed_condition(error):
                raise Changed(f"{url_of(self.fs, self.path(relative))} was changed by another writer") from None
            raise
        finally:
            self.fs.invalidate_cache(self.path(relative))

    def exists(self, relative: str) -> bool:
        return self.fs.exists(self.path(relative))

    def remove_file(self, relative: str) -> None:
        """Remove a file of the output, if it is there: on an object store one request, as
        removing a missing object succeeds."""
        try:
            self.fs.rm_file(self.path(relative))
        except FileNotFoundError:
            pass

    def remove(self, relative: str) -> None:
        """Remove a file or a directory of the output, with everything in it, if it is there. On
        S3 the path's own key and the keys one listing finds under it go in bulk requests (1,000
        keys each, and a missing key is no error): s3fs's own removal asks first, more than once,
        what the path is."""
        target = self.path(relative)
        if self.is_s3:
            self.fs.rm([target, *(path for path, _ in self._s3_files(target))])
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(target, recursive=True)

    def entries(self) -> list[str]:
        """The names at the output's top level, listed now (none if it does not exist)."""
        self.fs.invalidate_cache(self.root)
        try:
            return [path.rstrip("/").rsplit("/", 1)[-1] for path in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []


def _local_files(base: str) -> Iterator[tuple[str, int]]:
    """Each file under a local directory (none if it does not exist) and its size."""
    for directory, _, names in os.walk(base):
        for name in names:
            path = f"{directory}/{name}"
            with contextlib.suppress(FileNotFoundError):  # removed since (a staging file renamed): not there
                yield path, os.stat(path).st_size


def _failed_condition(error: OSError) -> bool:
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in _CONDITION_FAILED
