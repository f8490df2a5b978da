"""Streaming safetensors I/O.

`CheckpointReader` parses the shard headers itself (and checks them: truncated files, bad
offsets and missing shards are reported before any work), memory-maps lazily and hands out
one tensor at a time, or just the byte range of a tensor or of some of its rows.
`CheckpointWriter` writes sharded safetensors into a temporary sibling directory and renames
it into place only when everything is written and fsynced: a failure or a kill never leaves a
half-written output directory. Tensor data can come from memory or as byte ranges of source
files, which are copied in the kernel (copy_file_range) without passing through Python."""
from __future__ import annotations

import json
import logging
import mmap
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.core.errors import CheckpointError, OutputExistsError
from runtime.atomic import OUTPUT_ERRNOS, OutputError, atomic_write_json, fsync_dir, output_error

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_MAX_HEADER_BYTES = 100 * 1024**2
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# bytes per element of each safetensors dtype
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: absolute `offset` and `nbytes` inside `path`."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def row_ranges(self, rows: Iterable[int]) -> list[tuple[Path, int, int]]:
        """Byte ranges of the given indices along dim 0, merged where adjacent."""
        if not self.shape:
            raise CheckpointError(f"{self.path}: tensor {self.name!r} is a scalar, it has no rows to select")
        row_bytes = self.nbytes // self.shape[0]
        ranges: list[tuple[Path, int, int]] = []
        for row in rows:
            if not 0 <= row < self.shape[0]:
                raise CheckpointError(f"{self.path}: row {row} out of range for {self.name!r} {list(self.shape)}")
            start = self.offset + row * row_bytes
            if ranges and ranges[-1][1] + ranges[-1][2] == start:
                path, first, length = ranges[-1]
                ranges[-1] = (path, first, length + row_bytes)
            else:
                ranges.append((self.path, start, row_bytes))
        return ranges


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({exc}); restore the file") from None


def parse_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor table and metadata of one safetensors file; checks sizes and offsets."""
    try:
        file_bytes = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({file_bytes} bytes); re-copy or re-download it")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > _MAX_HEADER_BYTES or 8 + header_bytes > file_bytes:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header (declares {header_bytes} header bytes, "
                    f"file has {file_bytes}); re-copy or re-download it"
                )
            raw = fh.read(header_bytes)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: safetensors file not found") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc}); re-copy or re-download it") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_bytes
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}; re-copy or re-download it") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * DTYPE_BYTES[dtype] or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} {dtype}{list(shape)} has data_offsets {[begin, end]} that do not match its size"
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
        data_end = max(data_end, end)
    if data_start + data_end > file_bytes:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({file_bytes} bytes, tensors need {data_start + data_end}); "
            "re-copy or re-download it"
        )
    return tensors, metadata


class CheckpointReader:
    """Lazy, memory-mapped view of a Hugging Face safetensors checkpoint directory."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: model directory not found")
        self.config_path = self.model_dir / CONFIG_NAME
        self.config: dict = _read_json(self.config_path, "config.json")
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{self.config_path}: config.json must hold a JSON object")
        self.shard_paths = self._find_shards()
        self._tensors: dict[str, TensorInfo] = {}
        for shard in self.shard_paths:
            tensors, _ = parse_safetensors_header(shard)
            for name, info in tensors.items():
                if name in self._tensors:
                    raise CheckpointError(f"{shard}: tensor {name!r} also appears in {self._tensors[name].path.name}")
                self._tensors[name] = info
        if self._weight_map is not None:
            self._check_index()
        from packager.core.quant_formats import scheme_from_config

        # the checkpoint's quantization (unknown methods are refused here, for every stage)
        self.quant = scheme_from_config(self.config, self.config_path)
        self._maps: dict[Path, mmap.mmap] = {}
        self._handles: dict[Path, Any] = {}

    # -------------------------------------------------------------- discovery
    def _find_shards(self) -> list[Path]:
        index_path = self.model_dir / INDEX_NAME
        self.index_path: Path | None = None
        self._weight_map: dict[str, str] | None = None
        if index_path.exists():
            index = _read_json(index_path, "safetensors index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' in the safetensors index; restore the file")
            self.index_path, self._weight_map = index_path, weight_map
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.model_dir / f).is_file()]
            if missing:
                raise CheckpointError(
                    f"{index_path}: missing shard file(s) {', '.join(missing)}; copy the complete checkpoint"
                )
            return [self.model_dir / f for f in files]
        single = self.model_dir / SINGLE_NAME
        if single.is_file():
            return [single]
        found = sorted(self.model_dir.glob("*.safetensors"))
        if len(found) == 1:
            return found
        pickles = [p.name for p in self.model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{self.model_dir}: only pickle weights ({', '.join(pickles)}); they are never loaded here, "
                "convert the checkpoint to safetensors first"
            )
        if found:
            raise CheckpointError(f"{self.model_dir}: {len(found)} safetensors files but no {INDEX_NAME}")
        raise CheckpointError(f"{self.model_dir}: no {SINGLE_NAME} or {INDEX_NAME} found")

    def _check_index(self) -> None:
        for name, file_name in self._weight_map.items():
            info = self._tensors.get(name)
            if info is None or info.path.name != file_name:
                raise CheckpointError(
                    f"{self.index_path}: tensor {name!r} is listed in {file_name} but that shard does not hold it"
                )

    # -------------------------------------------------------------- access
    def names(self) -> list[str]:
        """Tensor names in storage order (shard by shard, by offset): sequential reads."""
        return [info.name for info in sorted(self._tensors.values(), key=lambda i: (str(i.path), i.offset))]

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.model_dir}: tensor {name!r} not found in the checkpoint") from None

    def infos(self) -> Iterator[TensorInfo]:
        for name in self.names():
            yield self._tensors[name]

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self._tensors.values())

    def read_bytes(self, name: str, rows: Iterable[int] | None = None) -> bytes:
        """Raw little-endian bytes of a tensor (or of some rows along dim 0)."""
        info = self.info(name)
        ranges = [(info.path, info.offset, info.nbytes)] if rows is None else info.row_ranges(rows)
        chunks = []
        for path, offset, length in ranges:
            mapped = self._maps.get(path)
            if mapped is None:
                with open(path, "rb") as fh:
                    mapped = self._maps[path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            chunks.append(mapped[offset:offset + length])
        return b"".join(chunks)

    def get(self, name: str):
        """One tensor as a torch tensor (memory-mapped read of that tensor only)."""
        from safetensors import safe_open

        info = self.info(name)
        handle = self._handles.get(info.path)
        if handle is None:
            handle = self._handles[info.path] = safe_open(str(info.path), framework="pt")
        return handle.get_tensor(name)

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ writing
_kernel_copy = {"available": hasattr(os, "copy_file_range")}


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Append `length` bytes at `offset` of src to dst's current position, in the kernel if possible."""
    remaining = length
    while remaining:
        done = -1
        if _kernel_copy["available"]:
            try:
                done = os.copy_file_range(src_fd, dst_fd, remaining, offset)
            except OSError as exc:
                logger.debug("copy_file_range unavailable (%s): copying through user space", exc)
                _kernel_copy["available"] = False
        if done <= 0:  # no kernel copy (other filesystem, old kernel): plain reads
            chunk = os.pread(src_fd, min(remaining, 16 * 1024**2), offset)
            if not chunk:
                raise CheckpointError(f"unexpected end of file while copying {length} bytes at offset {offset}")
            done = os.write(dst_fd, chunk)
        offset += done
        remaining -= done


@dataclass
class _Pending:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    data: bytes | None = None
    ranges: list[tuple[Path, int, int]] | None = None


def _partial_dir_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.partial-"


def _remove_stale_partials(out_dir: Path) -> None:
    """Staging directories of killed runs (their pid is gone) are removed."""
    prefix = _partial_dir_prefix(out_dir)
    if not out_dir.parent.is_dir():
        return
    for entry in out_dir.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        try:
            pid = int(entry.name[len(prefix):].split("-")[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            logger.info("removing stale partial output %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


class CheckpointWriter:
    """Sharded safetensors writer with an atomic final rename.

    Tensors are written in the order they are added; a shard is closed before it would pass
    `max_shard_bytes` (a single larger tensor gets a shard of its own). Extra files go into
    `staging_dir`. Nothing appears at `out_dir` before `finalize()`."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 force: bool = False, shard_metadata: dict[str, str] | None = None):
        if max_shard_bytes < 1:
            raise ValueError("max_shard_bytes must be positive")
        self.out_dir = Path(out_dir).absolute()
        self.max_shard_bytes = max_shard_bytes
        self.force = force
        if self.out_dir.exists() and not force:
            raise OutputExistsError(f"{self.out_dir}: output path exists; choose another path or pass --force")
        if not self.out_dir.parent.is_dir():
            raise OutputExistsError(f"{self.out_dir.parent}: parent directory of the output does not exist")
        _remove_stale_partials(self.out_dir)
        self.staging_dir = self.out_dir.parent / f"{_partial_dir_prefix(self.out_dir)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.staging_dir.mkdir()
        except OSError as exc:
            if exc.errno not in OUTPUT_ERRNOS:
                raise
            raise output_error(self.out_dir, exc) from None
        self._metadata = {"format": "pt", **(shard_metadata or {})}
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str], int]] = []  # (temp path, names, bytes)
        self._names: set[str] = set()
        self._state = "open"
        self.bytes_written = 0
        self.on_written = None  # optional callback(nbytes) after each tensor is on disk (progress)

    # -------------------------------------------------------------- adding
    def _add(self, pending: _Pending) -> None:
        if self._state != "open":
            raise RuntimeError(f"CheckpointWriter is {self._state}, cannot add {pending.name!r}")
        if pending.name in self._names:
            raise ValueError(f"tensor {pending.name!r} added twice")
        self._names.add(pending.name)
        if self._pending and self._pending_bytes + pending.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending.append(pending)
        self._pending_bytes += pending.nbytes
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def add_bytes(self, name: str, dtype: str, shape: Iterable[int], data: bytes) -> None:
        shape = tuple(int(d) for d in shape)
        self._check_size(name, dtype, shape, len(data))
        self._add(_Pending(name, dtype, shape, len(data), data=bytes(data)))

    def add_ranges(self, name: str, dtype: str, shape: Iterable[int], ranges: list[tuple[Path, int, int]]) -> None:
        """A tensor whose bytes are the concatenation of byte ranges of existing files."""
        shape = tuple(int(d) for d in shape)
        nbytes = sum(length for _, _, length in ranges)
        self._check_size(name, dtype, shape, nbytes)
        self._add(_Pending(name, dtype, shape, nbytes, ranges=list(ranges)))

    def add_tensor(self, name: str, tensor) -> None:
        """A torch tensor or numpy array held in memory."""
        from packager.core.fingerprint import tensor_to_bytes

        dtype, shape, data = tensor_to_bytes(tensor)
        self.add_bytes(name, dtype, shape, data)

    @staticmethod
    def _check_size(name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        numel = 1
        for dim in shape:
            numel *= dim
        if numel * DTYPE_BYTES[dtype] != nbytes:
            raise ValueError(f"tensor {name!r}: {nbytes} bytes do not match {dtype}{list(shape)}")

    # -------------------------------------------------------------- shards
    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.staging_dir / f"shard-{len(self._shards):05d}.tmp"
        header: dict[str, Any] = {"__metadata__": self._metadata}
        offset = 0
        for item in self._pending:
            header[item.name] = {"dtype": item.dtype, "shape": list(item.shape), "data_offsets": [offset, offset + item.nbytes]}
            offset += item.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        sources: dict[Path, int] = {}
        run: list = []  # [src, offset, length]: adjacent source ranges are copied in one call

        def copy_run() -> None:
            if run:
                if run[0] not in sources:
                    sources[run[0]] = os.open(run[0], os.O_RDONLY)
                copy_range(sources[run[0]], fd, run[1], run[2])
                run.clear()

        try:
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            for item in self._pending:
                if item.data is not None:
                    copy_run()
                    view = memoryview(item.data)
                    while view:
                        view = view[os.write(fd, view):]
                else:
                    for src, src_offset, length in item.ranges:
                        if run and run[0] == src and run[1] + run[2] == src_offset:
                            run[2] += length
                        else:
                            copy_run()
                            run.extend((src, src_offset, length))
                self.bytes_written += item.nbytes
                if self.on_written is not None:
                    self.on_written(item.nbytes)
            copy_run()
            os.fsync(fd)
        finally:
            os.close(fd)
            for src_fd in sources.values():
                os.close(src_fd)
        self._shards.append((path, [item.name for item in self._pending], offset))
        logger.debug("wrote shard %s: %d tensors, %d bytes", path.name, len(self._pending), offset)
        self._pending, self._pending_bytes = [], 0

    # -------------------------------------------------------------- finishing
    def finalize(self) -> Path:
        """Close the last shard, name shards, write the index, and rename into place."""
        if self._state != "open":
            raise RuntimeError(f"CheckpointWriter is {self._state}, cannot finalize")
        self._flush()
        n_shards = len(self._shards)
        if n_shards == 0:
            raise ValueError("no tensors were added")
        weight_map: dict[str, str] = {}
        total_bytes = 0
        for shard_idx, (path, names, nbytes) in enumerate(self._shards):
            final = SINGLE_NAME if n_shards == 1 else f"model-{shard_idx + 1:05d}-of-{n_shards:05d}.safetensors"
            os.rename(path, self.staging_dir / final)
            weight_map.update({name: final for name in names})
            total_bytes += nbytes
        if n_shards > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_json(self.staging_dir / INDEX_NAME, index)
        for entry in self.staging_dir.iterdir():  # extra files written by the caller too
            if entry.is_file():
                fd = os.open(entry, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(self.staging_dir)
        self._commit()
        self._state = "finalized"
        return self.out_dir

    def _commit(self) -> None:
        trash = None
        if self.out_dir.exists():
            if not self.force:
                raise OutputExistsError(f"{self.out_dir}: output path appeared while writing; nothing was replaced")
            trash = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.out_dir, trash)
        os.rename(self.staging_dir, self.out_dir)
        fsync_dir(self.out_dir.parent)
        if trash is not None:
            if trash.is_dir():
                shutil.rmtree(trash)
            else:
                trash.unlink()

    def abort(self) -> None:
        if self._state == "open":
            shutil.rmtree(self.staging_dir, ignore_errors=True)
            self._state = "aborted"

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()  # no-op after finalize()
        staged = isinstance(exc, OutputError) and exc.path is not None and self.staging_dir in exc.path.parents
        if isinstance(exc, OSError) and (staged or not isinstance(exc, OutputError)) and exc.errno in OUTPUT_ERRNOS:
            # a full disk, a read-only or vanished folder: one line naming the output, not its staging folder
            raise output_error(self.out_dir, exc) from None


@contextmanager
def safetensors_write_errors() -> Iterator[None]:
    """safetensors writes in native code and reports a failed write (a full disk, a read-only folder)
    as a SafetensorError whose text ends in "(os error N)". Inside this block such an error is raised
    as the OSError it stands for, so that `atomic_output` and the CLI report it in one line naming
    the path."""
    try:
        yield
    except Exception as exc:
        match = _OS_ERROR_TEXT.search(str(exc)) if type(exc).__name__ == "SafetensorError" else None
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code)) from None
