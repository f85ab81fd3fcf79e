"""One storage layer for every stage: local paths / file:// URIs, or s3://bucket/key via boto3.

S3 endpoint, credentials and region come from the standard AWS variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...). Writes are atomic: a reader never sees a half-written object (local
files are written to a temporary name and renamed; an S3 PUT is atomic by itself).
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from entityclip.errors import StorageError


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(root: str, *parts: str) -> str:
    """Join path parts under a root, keeping the URI scheme."""
    out = root.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"{uri}: an S3 URI needs a bucket (s3://bucket/key)")
    return parsed.netloc, parsed.path.lstrip("/")


@functools.lru_cache(maxsize=None)
def _s3_client(endpoint: str | None):
    import boto3
    from botocore.config import Config

    # Few, short retries: an unreachable endpoint should fail in seconds, not minutes.
    config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint or None, config=config)


def s3_client():
    return _s3_client(os.environ.get("AWS_ENDPOINT_URL"))


def arrow_fs(uri: str):
    """(pyarrow filesystem, path in it) for `uri`: what Ray Data and Ray Train take to read and
    write the same storage that boto3 reaches (same AWS_* variables)."""
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(local_path(uri).resolve())
    bucket, key = _split_s3(uri)
    endpoint = urlparse(os.environ.get("AWS_ENDPOINT_URL", ""))
    options = {"endpoint_override": endpoint.netloc, "scheme": endpoint.scheme} if endpoint.netloc else {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return pafs.S3FileSystem(region=region, **options), f"{bucket}/{key}".rstrip("/")


def _s3_error(uri: str, exc: Exception) -> StorageError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{uri}: no such object")
        if code == "NoSuchBucket":
            return StorageError(f"{uri}: no such bucket")
        return StorageError(f"{uri}: S3 refused the request ({code or exc})")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{uri}: cannot reach the S3 endpoint ({exc}); check AWS_ENDPOINT_URL")
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    return StorageError(f"{uri}: S3 error: {exc}")


def _s3_call(uri: str, fn):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn()
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(uri, exc) from None


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return _s3_call(uri, lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
    path = local_path(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read ({exc.strerror})") from None


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        _s3_call(uri, lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    path = local_path(uri)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot write ({exc.strerror})") from None


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = _split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _s3_error(uri, exc) from None
        except Exception as exc:  # connection errors
            raise _s3_error(uri, exc) from None
    return local_path(uri).exists()


def list_uris(prefix: str) -> list[str]:
    """Every object (file) under a directory prefix, sorted."""
    if is_s3(prefix):
        bucket, key = _split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""

        def _list():
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            return [f"s3://{bucket}/{obj['Key']}" for page in pages for obj in page.get("Contents", [])]

        return sorted(_s3_call(prefix, _list))
    root = local_path(prefix)
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


def list_children(prefix: str) -> set[str]:
    """Names of the files and folders directly under a directory prefix."""
    if is_s3(prefix):
        base = prefix.rstrip("/")
        return {item[len(base):].lstrip("/").split("/", 1)[0] for item in list_uris(base)}
    root = local_path(prefix)
    return {p.name for p in root.iterdir() if not p.name.endswith(".tmp")} if root.is_dir() else set()


def delete_tree(uri: str) -> None:
    """Delete a file or everything under a directory prefix (nothing there is fine)."""
    if is_s3(uri):
        for item in list_uris(uri):
            delete(item)
        if exists(uri):
            delete(uri)
        return
    path = local_path(uri)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def delete(uri: str) -> None:
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        _s3_call(uri, lambda: s3_client().delete_object(Bucket=bucket, Key=key))
        return
    local_path(uri).unlink(missing_ok=True)


def write_parquet(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue())


def read_parquet(uri: str) -> pa.Table:
    data = read_bytes(uri)
    try:
        return pq.read_table(pa.BufferReader(data))
    except pa.ArrowInvalid as exc:
        raise StorageError(f"{uri}: not a valid Parquet file ({exc})") from None


def parquet_rows(uri: str) -> int:
    """Row count from the Parquet footer, without reading the data."""
    fs, path = arrow_fs(uri)
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except (OSError, pa.ArrowInvalid) as exc:
        raise StorageError(f"{uri}: cannot read its Parquet footer ({exc})") from None


def write_json(uri: str, obj) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(uri: str):
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise StorageError(f"{uri}: not valid JSON ({exc})") from None


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy every file under a local directory to `uri` (same relative layout)."""
    local_dir = Path(local_dir)
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            write_bytes(join(uri, str(path.relative_to(local_dir))), path.read_bytes())


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy every object under `uri` into a local directory; returns it."""
    local_dir = Path(local_dir)
    base = uri.rstrip("/")
    found = list_uris(base)
    if not found:
        raise StorageError(f"{uri}: nothing stored there")
    root, targets = local_dir.resolve(), []
    for item in found:
        rel = item[len(base):].lstrip("/") if is_s3(base) else str(Path(item).relative_to(local_path(base)))
        target = (local_dir / rel).resolve()
        # An S3 key may hold "..": refuse one that leads outside the folder, before writing any.
        if not target.is_relative_to(root) or target == root:
            raise StorageError(f"{item}: its key leads outside {local_dir}; refusing to download {uri}")
        targets.append((item, target))
    for item, target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(item))
    return local_dir
