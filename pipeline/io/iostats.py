"""Counting the bytes a reader really takes from storage (``georetina query --stats``, benches).

A pyarrow filesystem that wraps another and counts every byte and request handed out by the
files it opens: footers, column chunks, everything the Parquet reader asks for.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs


@dataclass
class ReadCounter:
    """Bytes and requests read so far, and how many files were opened (thread-safe)."""

    bytes: int = 0
    requests: int = 0
    opened: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, count: int) -> None:
        with self._lock:
            self.bytes += count
            self.requests += 1

    def open(self) -> None:
        with self._lock:
            self.opened += 1


class _CountingReader(io.RawIOBase):
    """A readable, seekable file over a pyarrow input file that counts what it hands out."""

    def __init__(self, inner: pa.NativeFile, counter: ReadCounter) -> None:
        self._inner = inner
        self._counter = counter

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(None if size is None or size < 0 else size)
        self._counter.add(len(data))
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._inner.close()
        super().close()


class _CountingHandler(pafs.FileSystemHandler):
    """Reads through ``inner``, counting; nothing here writes."""

    def __init__(self, inner: pafs.FileSystem, counter: ReadCounter) -> None:
        self.inner = inner
        self.counter = counter

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def get_type_name(self) -> str:
        return f"counting+{self.inner.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.inner.get_file_info(selector)

    def open_input_file(self, path: str) -> pa.NativeFile:
        self.counter.open()
        return pa.PythonFile(_CountingReader(self.inner.open_input_file(path), self.counter), "r")

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.open_input_file(path)

    def _read_only(self, *_: object, **__: object) -> None:
        raise OSError("a counting filesystem only reads")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only


def counting_filesystem(inner: pafs.FileSystem) -> tuple[pafs.FileSystem, ReadCounter]:
    """``inner`` as seen through a byte counter, and the counter."""
    counter = ReadCounter()
    return pafs.PyFileSystem(_CountingHandler(inner, counter)), counter
