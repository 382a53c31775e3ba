"""The restricted unpickler behind `torch_bin`: torch's pickled state dicts, read as plain data.

A pickle can name any importable global and call it; that is how a `.bin` file can run code
when torch.load (without weights_only) reads it. `SafeUnpickler.find_class` admits only the
names tensor reconstruction uses, and returns for each an inert stand-in of ours:

- `torch._utils._rebuild_tensor{,_v2,_v3}` and `_rebuild_parameter{,_with_state}` build a
  `TensorRef` record (storage, dtype, offset, shape, stride) after checking their arguments;
- the storage classes (`torch.FloatStorage`, `torch.storage.UntypedStorage`, ...) and dtype
  names (`torch.float32`, ...) become name tokens that cannot be called;
- `collections.OrderedDict` is itself; `torch.Size` builds a tuple.

Everything else raises `ForbiddenGlobalError` naming the global, before the pickle can use it.
Storages arrive through `persistent_load` as `StorageRef`s; their bytes are read elsewhere.
"""
from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class TorchBinError(ValueError):
    """The file is not a readable PyTorch checkpoint: not a torch file, truncated or corrupt."""


class ForbiddenGlobalError(TorchBinError):
    """The pickle names a global that tensor reconstruction does not need; nothing was run."""


class _Malformed(ValueError):
    """A rebuild call or storage reference with arguments torch would never write."""


@dataclass(frozen=True)
class DType:
    """A tensor dtype we convert: its torch name, safetensors code and little-endian numpy type."""
    torch_name: str
    safetensors: str
    numpy: str

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.torch_name]


DTYPES = {d.torch_name: d for d in (
    DType("float64", "F64", "<f8"), DType("float32", "F32", "<f4"), DType("float16", "F16", "<f2"),
    DType("bfloat16", "BF16", "<u2"),  # kept as raw bits
    DType("int64", "I64", "<i8"), DType("int32", "I32", "<i4"), DType("int16", "I16", "<i2"),
    DType("int8", "I8", "|i1"), DType("uint8", "U8", "|u1"), DType("bool", "BOOL", "|b1"),
)}
# Element sizes of every dtype a torch pickle may name, converted or not (the others give a clear error).
_ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
    "int8": 1, "uint8": 1, "bool": 1, "complex32": 4, "complex64": 8, "complex128": 16,
    "uint16": 2, "uint32": 4, "uint64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,
    "bits1x8": 1, "bits2x4": 1, "bits4x2": 1, "bits8": 1, "bits16": 2,
}
# Legacy storage class name -> dtype of its elements (UntypedStorage counts bytes).
STORAGE_CLASSES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8", "QUInt8Storage": "quint8", "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4", "UntypedStorage": "uint8",
}
_STORAGE_MODULES = ("torch", "torch.storage", "torch.cuda")


def resolve_dtype(name: str, what: str) -> DType:
    """The DType for a torch dtype name; `what` names the tensor in the error."""
    if name not in DTYPES:
        raise TorchBinError(
            f"{what} has dtype torch.{name}, which this converter does not handle "
            f"(supported: {', '.join(DTYPES)}); cast it in torch before saving")
    return DTYPES[name]


@dataclass(frozen=True)
class StorageRef:
    """A storage named by the pickle: its key in the file, element type and length."""
    key: str
    dtype_name: str
    itemsize: int
    numel: int          # elements of the whole stored storage
    base: int = 0       # byte offset of this (legacy) storage view inside it

    def __setstate__(self, state):
        raise _Malformed("the pickle tries to set state on a storage")


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the pickle describes it: a strided view of a storage."""
    storage: StorageRef
    dtype_name: str
    itemsize: int
    offset: int         # in elements of the tensor's dtype
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]

    def __setstate__(self, state):
        raise _Malformed("the pickle tries to set state on a tensor")

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def byte_start(self) -> int:
        return self.storage.base + self.offset * self.itemsize

    @property
    def extent_bytes(self) -> int:
        """Bytes from the first to one past the last element the view touches."""
        if self.numel == 0:
            return 0
        return (1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))) * self.itemsize

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for n, s in zip(reversed(self.shape), reversed(self.stride)):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True


class _Inert:
    """Base of the stand-ins find_class hands out: no instance dict, no pickled state accepted."""
    __slots__ = ()

    def __setstate__(self, state):
        raise _Malformed(f"the pickle tries to set state on {self!r}")


class _StorageType(_Inert):
    __slots__ = ("dtype_name",)

    def __init__(self, dtype_name: str):
        self.dtype_name = dtype_name

    def __repr__(self):
        return f"<storage of {self.dtype_name}>"


class _DTypeName(_Inert):
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"<torch.{self.name}>"


class _Call(_Inert):
    __slots__ = ("label", "fn")

    def __init__(self, label: str, fn: Callable):
        self.label, self.fn = label, fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self):
        return f"<{self.label}>"


def _int(value, what: str) -> int:
    if not isinstance(value, int) or value < 0:
        raise _Malformed(f"{what} must be a non-negative integer, got {value!r:.60}")
    return value


def _ints(values, what: str) -> Tuple[int, ...]:
    if not isinstance(values, (tuple, list)):
        raise _Malformed(f"{what} must be a tuple of integers, got {values!r:.60}")
    return tuple(_int(v, what) for v in values)


def _tensor(storage, offset, size, stride, dtype: Optional[_DTypeName] = None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise _Malformed(f"a tensor is rebuilt from {storage!r:.60}, which is not a storage")
    shape, strides = _ints(size, "tensor size"), _ints(stride, "tensor stride")
    if len(shape) != len(strides):
        raise _Malformed(f"tensor size {shape} and stride {strides} differ in length")
    if dtype is not None and not isinstance(dtype, _DTypeName):
        raise _Malformed(f"tensor dtype {dtype!r:.60} is not a torch dtype")
    name = dtype.name if dtype is not None else storage.dtype_name
    return TensorRef(storage, name, _ITEMSIZE[name], _int(offset, "storage offset"), shape, strides)


def _rebuild_tensor(storage, offset, size, stride):
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, TensorRef):
        raise _Malformed(f"a parameter is rebuilt from {data!r:.60}, which is not a tensor")
    return data


def _size(values=()):
    return _ints(values, "torch.Size")


_CALLS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _size,
}


def allowed_global(module: str, name: str):
    """The stand-in for an admitted global, or None."""
    if (module, name) in _CALLS:
        return _Call(f"{module}.{name}", _CALLS[(module, name)])
    if module in _STORAGE_MODULES and name in STORAGE_CLASSES:
        return _StorageType(STORAGE_CLASSES[name])
    if module == "torch" and name in _ITEMSIZE:
        return _DTypeName(name)
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    return None


def _ascii(value) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else value


class SafeUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict; storages go to `on_storage`, forbidden globals raise."""

    def __init__(self, fh, source: str, on_storage: Callable[[StorageRef], StorageRef]):
        super().__init__(fh, encoding="utf-8")
        self._source = source
        self._on_storage = on_storage

    def find_class(self, module, name):
        target = allowed_global(module, name)
        if target is None:
            raise ForbiddenGlobalError(
                f"{self._source} asks to load the Python global '{module}.{name}', which a tensor "
                "state dict never needs; it was refused and nothing in the file was run. Only convert "
                "files from a source you trust; if you trust this one, load it with torch and save "
                "its state dict (a dict of tensors) again")
        return target

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or _ascii(pid[0]) != "storage":
            raise _Malformed(f"unexpected persistent id {pid!r:.80}")
        stype, key, _location, numel = pid[1:5]
        if not isinstance(stype, _StorageType):
            raise _Malformed(f"storage type {stype!r:.60} is not a torch storage class")
        key = _ascii(key)
        if not isinstance(key, str) or not key or "/" in key or key.startswith("."):
            raise _Malformed(f"storage key {key!r:.60} is not valid")
        itemsize = _ITEMSIZE[stype.dtype_name]
        base = 0
        view = pid[5] if len(pid) == 6 else None
        if view is not None:  # legacy storage view: (view key, element offset, element count)
            if not isinstance(view, tuple) or len(view) != 3:
                raise _Malformed(f"storage view {view!r:.60} is not valid")
            base = _int(view[1], "storage view offset") * itemsize
        ref = StorageRef(key, stype.dtype_name, itemsize, _int(numel, "storage size"), base)
        return self._on_storage(ref)


def unpickle(fh, source: str, on_storage: Callable[[StorageRef], StorageRef]):
    """One pickle from `fh` through SafeUnpickler; any failure becomes a TorchBinError naming `source`."""
    try:
        return SafeUnpickler(fh, source, on_storage).load()
    except TorchBinError:
        raise
    except Exception as exc:  # the pickle machinery raises many kinds on corrupt input
        raise TorchBinError(
            f"{source}: its pickled data is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "download it again (or re-save it with torch.save)") from exc
