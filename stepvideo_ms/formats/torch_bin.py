"""Reading PyTorch `.bin` checkpoints (what `torch.save` writes) without torch, and safely.

Two layouts exist:
- zip (torch >= 1.6): `<name>/data.pkl` (the pickled state dict), `<name>/byteorder`, and one
  archive entry `<name>/data/<key>` per storage holding its raw bytes;
- legacy (`_use_new_zipfile_serialization=False`): one stream of pickles (magic number,
  protocol version, system info, the state dict, the list of storage keys), followed by each
  storage's raw bytes, each prefixed by its element count as an 8-byte integer.

The state dict is unpickled by `SafeUnpickler`, whose `find_class` admits only the globals that
tensor reconstruction names (the torch rebuild functions, storage classes, dtype names,
OrderedDict) and maps each to an inert stand-in of ours: any other global (os.system, eval,
a model class) stops the load with `ForbiddenGlobalError` before anything runs. Tensors come out
as `TensorRef` records (storage key, dtype, offset, shape, stride); their bytes are read on
request, one tensor at a time, so memory stays near the size of one tensor (or one read chunk).
bfloat16 tensors are returned as their raw bits in uint16 arrays.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from .torch_pickle import (
    LEGACY_MAGIC, LEGACY_PROTOCOL, DType, ForbiddenGlobalError, StorageRef, TensorRef, TorchBinError,
    resolve_dtype, unpickle)

__all__ = ["TorchCheckpoint", "TorchBinError", "ForbiddenGlobalError", "DType", "load_bin"]

ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")
ZIP_LOCAL_MAGIC = b"PK\x03\x04"
DEFAULT_CHUNK_BYTES = 16 << 20
REDOWNLOAD = "download it again (or re-save it with torch.save)"


@dataclass(frozen=True)
class _Span:
    """Where one storage's bytes live in the file."""
    offset: int                     # absolute file offset of its first byte (unused for compressed entries)
    nbytes: int
    zip_name: Optional[str] = None  # set for compressed zip entries, which are read through zipfile
    crc: Optional[int] = None       # the zip entry's CRC-32, checked when a read covers the whole entry


class TorchCheckpoint:
    """One PyTorch `.bin` file, opened: tensor names, shapes and dtypes now, data on request.

    Raises `TorchBinError` (or its subclass `ForbiddenGlobalError`) with the file name and the fix
    when the file is not a torch checkpoint, is truncated or corrupt, or names a forbidden global.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._size = os.path.getsize(path)
            self._fh = open(path, "rb")
        except OSError as exc:
            raise TorchBinError(f"cannot read {path}: {exc.strerror}") from exc
        self._zip: Optional[zipfile.ZipFile] = None
        self._spans: Dict[str, _Span] = {}
        self.big_endian = False
        try:
            self.format = self._detect()
            if self.format == "zip":
                refs = self._open_zip()
            else:
                refs = self._open_legacy()
            self.tensors: Dict[str, TensorRef] = self._check_tensors(refs)
        except BaseException:
            self.close()
            raise

    # ----- opening -----------------------------------------------------------------------------
    def _detect(self) -> str:
        head = self._fh.read(16)
        if head.startswith(ZIP_LOCAL_MAGIC):
            return "zip"
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            return "legacy"
        if len(head) >= 9 and head[8:9] == b"{":
            raise TorchBinError(f"{self.path} looks like a safetensors file already: no conversion is needed")
        if not head:
            raise TorchBinError(f"{self.path} is empty: {REDOWNLOAD}")
        raise TorchBinError(
            f"{self.path} is not a PyTorch checkpoint (expected the zip archive or the legacy pickle "
            "stream that torch.save writes)")

    def _open_zip(self) -> dict:
        try:
            self._zip = zipfile.ZipFile(self._fh)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise TorchBinError(
                f"{self.path} starts like a PyTorch zip checkpoint but its zip directory (at the end of "
                f"the file) is missing or damaged: the file is truncated or corrupt; {REDOWNLOAD}") from exc
        pickles = [n for n in self._zip.namelist() if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if len(pickles) != 1:
            raise TorchBinError(
                f"{self.path} is a zip archive but not a PyTorch checkpoint: expected one '<name>/data.pkl' "
                f"record, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        order = self._read_member(prefix + "byteorder", b"little").decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise TorchBinError(f"{self.path}: unknown byteorder record {order!r}: the file is corrupt; {REDOWNLOAD}")
        self.big_endian = order == "big"
        payload = self._read_member(pickles[0], None)
        storages: Dict[str, StorageRef] = {}
        obj = unpickle(io.BytesIO(payload), self.path, lambda ref: self._note_storage(storages, ref))
        for key, ref in storages.items():
            self._spans[key] = self._zip_span(prefix + "data/" + key, ref)
        return self._state_dict(obj)

    def _read_member(self, name: str, default: Optional[bytes]) -> bytes:
        try:
            return self._zip.read(name)
        except KeyError:
            if default is not None:
                return default
            raise TorchBinError(f"{self.path}: archive record {name} is missing; {REDOWNLOAD}") from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
            raise TorchBinError(f"{self.path}: archive record {name} is corrupt ({exc}); {REDOWNLOAD}") from exc

    def _zip_span(self, name: str, ref: StorageRef) -> _Span:
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise TorchBinError(
                f"{self.path}: the state dict refers to storage record {name}, which the archive lacks: "
                f"the file is corrupt or incomplete; {REDOWNLOAD}") from None
        if info.compress_type != zipfile.ZIP_STORED:
            return _Span(0, info.file_size, zip_name=name, crc=info.CRC)
        self._fh.seek(info.header_offset)
        raw = self._fh.read(ZIP_LOCAL_HEADER.size)
        if len(raw) < ZIP_LOCAL_HEADER.size or raw[:4] != ZIP_LOCAL_MAGIC:
            raise TorchBinError(f"{self.path}: the zip header of {name} is damaged; {REDOWNLOAD}")
        _, name_len, extra_len = ZIP_LOCAL_HEADER.unpack(raw)
        start = info.header_offset + ZIP_LOCAL_HEADER.size + name_len + extra_len
        if start + info.file_size > self._size:
            raise TorchBinError(f"{self.path} is truncated: storage record {name} runs past the end of the file; {REDOWNLOAD}")
        return _Span(start, info.file_size, crc=info.CRC)

    def _open_legacy(self) -> dict:
        self._fh.seek(0)
        storages: Dict[str, StorageRef] = {}

        def no_storage(ref):
            raise TorchBinError(f"{self.path}: unexpected storage reference in the legacy file header; {REDOWNLOAD}")

        magic = unpickle(self._fh, self.path, no_storage)
        if magic != LEGACY_MAGIC:
            raise TorchBinError(f"{self.path} is a pickle but not a PyTorch checkpoint (no torch.save magic number)")
        version = unpickle(self._fh, self.path, no_storage)
        if version != LEGACY_PROTOCOL:
            raise TorchBinError(f"{self.path}: legacy torch format version {version!r} is not supported (only {LEGACY_PROTOCOL})")
        info = unpickle(self._fh, self.path, no_storage)
        if not isinstance(info, dict):
            raise TorchBinError(f"{self.path}: the legacy header is corrupt; {REDOWNLOAD}")
        self.big_endian = not info.get("little_endian", True)
        obj = unpickle(self._fh, self.path, lambda ref: self._note_storage(storages, ref))
        keys = unpickle(self._fh, self.path, no_storage)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise TorchBinError(f"{self.path}: the legacy storage key list is corrupt; {REDOWNLOAD}")
        offset = self._fh.tell()
        count_fmt = ">q" if self.big_endian else "<q"
        for key in keys:
            if key not in storages:
                raise TorchBinError(f"{self.path}: storage {key} is listed but never used; the file is corrupt; {REDOWNLOAD}")
            self._fh.seek(offset)
            raw = self._fh.read(8)
            if len(raw) < 8:
                raise TorchBinError(f"{self.path} is truncated: storage {key} is missing; {REDOWNLOAD}")
            (count,) = struct.unpack(count_fmt, raw)
            nbytes = count * storages[key].itemsize
            if count < 0 or offset + 8 + nbytes > self._size:
                raise TorchBinError(f"{self.path} is truncated: storage {key} runs past the end of the file; {REDOWNLOAD}")
            self._spans[key] = _Span(offset + 8, nbytes)
            offset += 8 + nbytes
        missing = sorted(set(storages) - set(self._spans))
        if missing:
            raise TorchBinError(f"{self.path}: storages {missing[:5]} are used but not stored; the file is corrupt; {REDOWNLOAD}")
        return self._state_dict(obj)

    def _note_storage(self, storages: Dict[str, StorageRef], ref: StorageRef) -> StorageRef:
        known = storages.setdefault(ref.key, ref)
        if known.dtype_name != ref.dtype_name or known.numel != ref.numel:
            raise TorchBinError(f"{self.path}: storage {ref.key} is described twice, differently; the file is corrupt")
        return ref

    def _state_dict(self, obj) -> dict:
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise TorchBinError(
                f"{self.path} holds a pickled {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
        bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, TensorRef)]
        if bad:
            raise TorchBinError(
                f"{self.path}: entries {[str(k) for k in bad[:5]]} are not tensors; only a state dict of tensors "
                "can be converted (save model.state_dict() with torch.save)")
        return obj

    def _check_tensors(self, refs: dict) -> Dict[str, TensorRef]:
        for name, ref in refs.items():
            resolve_dtype(ref.dtype_name, f"{self.path}: tensor {name!r}")
            span = self._spans[ref.storage.key]
            if ref.storage.numel * ref.storage.itemsize > span.nbytes:
                raise TorchBinError(
                    f"{self.path}: storage {ref.storage.key} should hold {ref.storage.numel} elements but its "
                    f"record has {span.nbytes} bytes: the file is truncated or corrupt; {REDOWNLOAD}")
            end = ref.byte_start + ref.extent_bytes
            if end > span.nbytes:
                raise TorchBinError(
                    f"{self.path}: tensor {name!r} (shape {ref.shape}, stride {ref.stride}, offset {ref.offset}) "
                    f"reaches byte {end} of storage {ref.storage.key}, which holds {span.nbytes}: "
                    f"the file is corrupt; {REDOWNLOAD}")
        return dict(refs)

    # ----- reading -----------------------------------------------------------------------------
    def keys(self):
        return self.tensors.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def dtype(self, name: str) -> DType:
        return resolve_dtype(self.tensors[name].dtype_name, name)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.tensors[name].shape

    def nbytes(self, name: str) -> int:
        return self.tensors[name].numel * self.dtype(name).itemsize

    def storage_position(self, name: str) -> Tuple[int, int]:
        """(file offset of the tensor's storage, byte offset in it): reading in this order is sequential."""
        ref = self.tensors[name]
        return self._spans[ref.storage.key].offset, ref.byte_start

    def get(self, name: str) -> np.ndarray:
        """The tensor as a C-contiguous little-endian numpy array (bfloat16 as uint16 bits), a copy."""
        ref, dt = self.tensors[name], self.dtype(name)
        if ref.numel == 0:
            return np.zeros(ref.shape, dtype=dt.numpy)
        raw = self._read(ref.storage.key, ref.byte_start, ref.extent_bytes)
        flat = raw.view(np.dtype(dt.numpy).newbyteorder(">" if self.big_endian else "<"))
        view = np.lib.stride_tricks.as_strided(
            flat, shape=ref.shape, strides=tuple(s * dt.itemsize for s in ref.stride), writeable=False)
        return np.array(view, dtype=dt.numpy, order="C")

    def chunks(self, name: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> "TensorStream":
        """The tensor's little-endian C-order bytes, in pieces of at most `chunk_bytes`.

        A contiguous tensor is streamed straight from the file (memory stays at one chunk); each piece
        is valid only until the next is requested. The returned stream's `crc` is the CRC-32 of all
        bytes once iterated; a tensor that covers a whole zip record has that record's CRC-32 checked.
        """
        return TensorStream(self, name, chunk_bytes)

    def _tensor_pieces(self, name: str, chunk_bytes: int) -> Tuple[Iterator[memoryview], Optional[int]]:
        """(pieces, CRC-32 the pieces must have or None)."""
        ref = self.tensors[name]
        if ref.numel == 0:
            return iter(()), None
        if not ref.is_contiguous or (self.big_endian and self.dtype(name).itemsize > 1):
            data = memoryview(self.get(name).reshape(-1).view(np.uint8))
            return (data[b:b + chunk_bytes] for b in range(0, len(data), chunk_bytes)), None
        span = self._spans[ref.storage.key]
        whole = ref.byte_start == 0 and ref.extent_bytes == span.nbytes
        return self._pieces(span, ref.byte_start, ref.extent_bytes, chunk_bytes), span.crc if whole else None

    def _read(self, key: str, begin: int, nbytes: int) -> np.ndarray:
        span = self._spans[key]
        out = np.empty(nbytes, dtype=np.uint8)
        if span.zip_name is None:
            self._pread_into(memoryview(out), span.offset + begin)
            return out
        pos = 0
        for piece in self._compressed_pieces(span.zip_name, begin, nbytes, DEFAULT_CHUNK_BYTES):
            out[pos:pos + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            pos += len(piece)
        return out

    def _pieces(self, span: _Span, begin: int, nbytes: int, chunk_bytes: int) -> Iterator[memoryview]:
        if span.zip_name is not None:
            yield from self._compressed_pieces(span.zip_name, begin, nbytes, chunk_bytes)
            return
        buf = memoryview(bytearray(min(chunk_bytes, nbytes)))
        for pos in range(0, nbytes, chunk_bytes):
            want = min(chunk_bytes, nbytes - pos)
            self._pread_into(buf[:want], span.offset + begin + pos)
            yield buf[:want]

    def _pread_into(self, buf: memoryview, offset: int):
        """Fill `buf` from the file at `offset` (positional reads: no shared file position)."""
        done = 0
        while done < len(buf):
            got = os.preadv(self._fh.fileno(), [buf[done:]], offset + done)
            if got <= 0:
                raise TorchBinError(f"{self.path} is truncated (a storage ends early); {REDOWNLOAD}")
            done += got

    def _compressed_pieces(self, name: str, begin: int, nbytes: int, chunk_bytes: int) -> Iterator[memoryview]:
        try:
            with self._zip.open(name) as member:
                member.seek(begin)
                for pos in range(0, nbytes, chunk_bytes):
                    piece = member.read(min(chunk_bytes, nbytes - pos))
                    if not piece:
                        raise TorchBinError(f"{self.path}: record {name} is truncated; {REDOWNLOAD}")
                    yield memoryview(piece)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise TorchBinError(f"{self.path}: record {name} is corrupt ({exc}); {REDOWNLOAD}") from exc

    def close(self):
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TensorStream:
    """Iterates over one tensor's bytes (see TorchCheckpoint.chunks); `crc` is theirs once done."""

    def __init__(self, ckpt: TorchCheckpoint, name: str, chunk_bytes: int):
        self._ckpt, self._name, self._chunk = ckpt, name, chunk_bytes
        self.crc = 0

    def __iter__(self) -> Iterator[memoryview]:
        pieces, expected = self._ckpt._tensor_pieces(self._name, self._chunk)
        crc = 0
        for piece in pieces:
            crc = zlib.crc32(piece, crc)
            yield piece
        self.crc = crc
        if expected is not None and crc != expected:
            raise TorchBinError(
                f"{self._ckpt.path}: the bytes of tensor {self._name!r} fail their CRC-32 check: the file "
                f"is corrupt; {REDOWNLOAD}")


def load_bin(path: str) -> Dict[str, np.ndarray]:
    """Every tensor of a `.bin` file as numpy arrays (bfloat16 as uint16 bits)."""
    with TorchCheckpoint(path) as ckpt:
        return {name: ckpt.get(name) for name in ckpt.keys()}
