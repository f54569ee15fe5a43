"""Reading the released PanoHead pickle without running any code stored in it.

The `.pkl` is a plain pickle of a dict {G, D, G_ema, training_set_kwargs, augment_pipe}. Its
networks were saved by `torch_utils.persistence`, which pickles each decorated module as a call
`torch_utils.persistence._reconstruct_persistent_obj(meta)` where `meta` carries the class
name, the Python source of its module (normal loading `exec`s it), and the object's state
(`_parameters`, `_buffers`, `_modules`, `_init_kwargs`, ...).

`SafeUnpickler` resolves only an allow-list of globals: torch's tensor-rebuild helpers, a
storage loader that itself uses `torch.load(weights_only=True)`, `collections.OrderedDict`,
numpy's array reconstruction, and inert records standing in for the persistent classes and for
any module class (torch.nn or project). Anything else (`os.system`, `builtins.exec`,
`subprocess`, ...) raises `UnsafePickleError` before it is called. `module_src` is kept as a
string and never executed.
"""

from __future__ import annotations

import collections
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import Dp360Error
from ..safety import one_line

PERSISTENT_RECONSTRUCT = ("torch_utils.persistence", "_reconstruct_persistent_obj")
# Modules whose classes are replaced by inert records (never imported, never instantiated).
RECORDED_MODULE_PREFIXES = ("training.", "torch_utils.", "dnnlib.", "torch.nn.modules.")


class UnsafePickleError(Dp360Error):
    """The pickle asks for something the restricted loader does not allow. Raised inside the
    unpickler with what the pickle does ("refers to posix.system, ..."); `read_network_pickle`
    re-raises it as a sentence naming the file."""


def _load_storage_from_bytes(data: bytes):
    # torch pickles storages as bytes of a nested torch.save; read them the safe way too.
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:  # torch's text would advise weights_only=False
        raise UnsafePickleError("holds a tensor storage with pickled code or objects that are not tensors") from None


def _rebuild_from_type_v2(function, new_type, args, state):
    # Tensor subclasses (nn.Parameter) rebuilt by torch.load; only the allowed rebuild
    # functions can reach here, and only plain tensor types are accepted.
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UnsafePickleError(f"rebuilds a tensor as {new_type!r}, which dp360 does not load")
    tensor = function(*args)
    return tensor if new_type is torch.Tensor else torch.nn.Parameter(tensor, requires_grad=tensor.requires_grad)


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): getattr(torch._utils, "_rebuild_parameter_with_state", None),
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("builtins", "object"): object,  # the base argument of copyreg._reconstructor
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "float32"): torch.float32,
    ("torch", "float16"): torch.float16,
}


def _numpy_globals() -> dict[tuple[str, str], Any]:
    import numpy as np
    import numpy.core.multiarray as multiarray

    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy.core.multiarray", "scalar"): multiarray.scalar,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "scalar"): multiarray.scalar,
    }
    return allowed


@dataclass
class PersistentRecord:
    """What `_reconstruct_persistent_obj(meta)` would have rebuilt, as plain data."""

    class_name: str
    init_args: tuple
    init_kwargs: dict[str, Any]
    state: dict[str, Any]
    module_src_length: int = 0


class RecordedObject:
    """Stand-in for an instance of a class the loader does not import (torch.nn.Sequential,
    RaySampler, dnnlib.EasyDict, discriminator parts, ...): it keeps its state and nothing else."""

    recorded_path = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs, self.state = args, kwargs, {}
        self.items: dict[Any, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state

    # dict-like classes (EasyDict) are filled with SETITEMS
    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value


_recorded_classes: dict[str, type] = {}


def _recorded_class(path: str) -> type:
    if path not in _recorded_classes:
        _recorded_classes[path] = type(path.rsplit(".", 1)[-1], (RecordedObject,), {"recorded_path": path})
    return _recorded_classes[path]


def _reconstruct_record(meta: dict[str, Any]) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafePickleError("holds a persistent object dp360 does not understand (not a class record)")
    state = meta.get("state") or {}
    return PersistentRecord(
        class_name=str(meta.get("class_name")),
        init_args=tuple(state.get("_init_args", ())),
        init_kwargs=_plain(state.get("_init_kwargs", {})),
        state=state,
        module_src_length=len(meta.get("module_src") or ""),
    )


def _copyreg_reconstructor(cls, base, state):
    if isinstance(cls, type) and issubclass(cls, RecordedObject):
        return cls()
    raise UnsafePickleError(f"reconstructs an object of {cls!r}, which dp360 does not load")


class SafeUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self.allowed = {
            key: value for key, value in {**ALLOWED_GLOBALS, **_numpy_globals()}.items() if value is not None
        }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == PERSISTENT_RECONSTRUCT:
            return _reconstruct_record
        if (module, name) == ("copyreg", "_reconstructor"):
            return _copyreg_reconstructor
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module.startswith(RECORDED_MODULE_PREFIXES) and name[:1].isupper():
            return _recorded_class(f"{module}.{name}")
        raise UnsafePickleError(f"refers to {module}.{name}, which the safe PanoHead loader does not allow")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("uses persistent ids (a torch.save archive?), which this loader does not accept")


def _plain(value: Any) -> Any:
    """Recorded dict-likes (EasyDict) and nested containers as plain Python data."""
    if isinstance(value, RecordedObject):
        merged = dict(value.items)
        if isinstance(value.state, dict):
            merged.update(value.state)
        return {key: _plain(item) for key, item in merged.items()}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0:
        return value.item()  # numpy scalars
    return value


@dataclass
class PickledNetwork:
    class_name: str
    init_kwargs: dict[str, Any]
    state_dict: collections.OrderedDict[str, torch.Tensor] = field(default_factory=collections.OrderedDict)


def _module_state(node: Any) -> dict[str, Any]:
    if isinstance(node, PersistentRecord):
        return node.state
    if isinstance(node, RecordedObject) and isinstance(node.state, dict):
        return node.state
    raise UnsafePickleError(f"holds an unexpected {type(node).__name__} in its module tree")


def collect_state_dict(
    node: Any, prefix: str = "", out: collections.OrderedDict | None = None
) -> collections.OrderedDict[str, torch.Tensor]:
    """Walk `_parameters`, persistent `_buffers` and `_modules` the way `state_dict()` does."""
    out = collections.OrderedDict() if out is None else out
    state = _module_state(node)
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else value
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in non_persistent:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            collect_state_dict(child, f"{prefix}{name}.", out)
    return out


def read_network_pickle(path: str | Path, key: str = "G_ema") -> PickledNetwork:
    """The class name, constructor kwargs and state dict of `key` in a PanoHead pickle."""
    advice = "download the released file again with `dp360 weights download panohead`"
    try:
        with open(path, "rb") as handle:
            data = SafeUnpickler(handle).load()
        data = data if isinstance(data, dict) else _plain(data)
        if not isinstance(data, dict) or key not in data:
            keys = ", ".join(map(str, list(data)[:8])) if isinstance(data, dict) else type(data).__name__
            raise Dp360Error(
                f"'{path}' has no '{key}' network (it holds {one_line(keys, 80)}); is it a PanoHead training snapshot?"
            )
        record = data[key]
        if not isinstance(record, PersistentRecord):
            raise Dp360Error(f"'{key}' in '{path}' is not a persistent network record; {advice}.")
        state_dict = collect_state_dict(record)
    except UnsafePickleError as error:
        raise UnsafePickleError(
            f"'{path}' {error}, so it is not the released PanoHead file or it has been tampered with; {advice}."
        ) from None
    except Dp360Error:
        raise
    except Exception as error:  # noqa: BLE001 - includes RecursionError (nesting too deep) and MemoryError
        raise Dp360Error(
            f"'{path}' is not a readable PanoHead pickle ({type(error).__name__}: {one_line(error, 120)}); {advice}."
        ) from None
    strays = [name for name, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if strays:
        raise Dp360Error(f"'{path}' holds non-tensor weights ({one_line(', '.join(strays[:4]), 120)}); {advice}.")
    return PickledNetwork(record.class_name, record.init_kwargs, state_dict)


# --------------------------------------------------------------------------------------------
# Writing pickles in the same layout (tiny test generators, `dp360 doctor --smoke`)
# --------------------------------------------------------------------------------------------


class _BuiltinStandIn:
    """Pickles like a torch.nn built-in module (class by import path, state by BUILD), with its
    children converted as well."""

    def __init__(self, cls: type, state: dict[str, Any]):
        self.cls, self.state = cls, state

    def __reduce__(self):
        import copyreg

        return (copyreg._reconstructor, (self.cls, object, None), self.state)


class _PersistentStandIn:
    """Pickles as `_reconstruct_persistent_obj(meta)`, like `torch_utils.persistence` does."""

    def __init__(self, meta: dict[str, Any]):
        self.meta = meta

    def __reduce__(self):
        return (_persistence_function(), (self.meta,))


def _persistence_function():
    import sys
    import types

    module = sys.modules.get(PERSISTENT_RECONSTRUCT[0])
    if module is None:
        # A placeholder module so that pickle can refer to the function by name; it never runs.
        package = sys.modules.setdefault("torch_utils", types.ModuleType("torch_utils"))
        module = types.ModuleType(PERSISTENT_RECONSTRUCT[0])

        def _reconstruct_persistent_obj(meta):  # pragma: no cover - never called by dp360
            raise RuntimeError("placeholder")

        _reconstruct_persistent_obj.__module__ = PERSISTENT_RECONSTRUCT[0]
        _reconstruct_persistent_obj.__qualname__ = PERSISTENT_RECONSTRUCT[1]
        module._reconstruct_persistent_obj = _reconstruct_persistent_obj
        sys.modules[PERSISTENT_RECONSTRUCT[0]] = module
        package.persistence = module
    return module._reconstruct_persistent_obj


def _module_tree_state(module: torch.nn.Module, init_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    children = collections.OrderedDict()
    for name, child in module._modules.items():
        if child is None:
            children[name] = None
        elif type(child).__module__.startswith("torch.nn"):
            # torch built-ins (Sequential, Softplus) pickle by import path
            children[name] = _BuiltinStandIn(type(child), _module_tree_state(child, None))
        else:
            children[name] = _persistent_tree(child, f"training.{type(child).__name__}")
    return {
        "training": module.training,
        "_parameters": collections.OrderedDict((k, v) for k, v in module._parameters.items()),
        "_buffers": collections.OrderedDict((k, v) for k, v in module._buffers.items()),
        "_non_persistent_buffers_set": set(module._non_persistent_buffers_set),
        "_modules": children,
        "_init_args": (),
        "_init_kwargs": init_kwargs or {},
    }


def _persistent_tree(
    module: torch.nn.Module, class_name: str, init_kwargs: dict[str, Any] | None = None
) -> _PersistentStandIn:
    state = _module_tree_state(module, init_kwargs)
    return _PersistentStandIn(
        {
            "type": "class",
            "version": 6,
            "module_src": f"# source of {class_name}\n",
            "class_name": class_name,
            "state": state,
        }
    )


def write_network_pickle(path: str | Path, generator: torch.nn.Module, init_kwargs: dict[str, Any]) -> Path:
    """Write `generator` as a training snapshot in the persistence layout ({'G_ema': ...})."""
    from ..atomic import atomic_path

    tree = _persistent_tree(generator, "training.triplane.TriPlaneGenerator", init_kwargs)
    with atomic_path(Path(path)) as temporary, open(temporary, "wb") as handle:
        pickle.dump(
            {"G_ema": tree, "training_set_kwargs": {"resolution": init_kwargs.get("img_resolution")}},
            handle,
            protocol=4,
        )
    return Path(path)
