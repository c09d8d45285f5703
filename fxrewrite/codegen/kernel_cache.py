"""Where generated kernels live: source files on disk, loaded kernels in a bounded in-process cache.

One piece for the forward kernels (`runtime`) and the backward kernels (`backward`): a kernel's
source is a function of its structural key, written to `<kernel>_<key>_<source hash>.py` under
$FXREWRITE_CACHE_DIR (default ~/.cache/fx-rewrite/kernels), atomically, and imported once per
process. The source's own hash in the name means two versions of the generator (two installs
sharing the directory, a test that plants a wrong kernel) never share a file: none can import
the other's source between its check and its import. Triton keeps its own cache of the compiled binaries. The in-process caches are LRUs
of at most `maxsize` entries: they are keyed by shapes, and a model fed many shapes (dynamic
batch, varying sequence lengths) must not grow them without end; an evicted kernel's module
leaves `sys.modules` too. Imports neither `runtime` nor `backward` (both import it).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

CACHE_SIZE = 256  # entries kept by each in-process cache (kernels, launch plans)


class LRU:
    """A thread-safe map that keeps its `maxsize` most recently used entries (None: absent).
    `on_evict(key, value)` runs for each entry pushed out."""

    def __init__(self, maxsize: int, on_evict=None):
        self.maxsize = maxsize
        self.on_evict = on_evict
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        # no lock on the hit path (every region call takes it): OrderedDict's get and
        # move_to_end are each atomic under the GIL; an entry evicted in between is a miss
        value = self._d.get(key)
        if value is not None:
            try:
                self._d.move_to_end(key)
            except KeyError:
                pass
        return value

    def put(self, key, value) -> None:
        evicted = []
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                evicted.append(self._d.popitem(last=False))
        for old_key, old_value in evicted:
            if self.on_evict is not None:
                self.on_evict(old_key, old_value)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def values(self) -> list:
        with self._lock:
            return list(self._d.values())

    def __len__(self) -> int:
        return len(self._d)


def cache_dir() -> Path:
    """$FXREWRITE_CACHE_DIR or ~/.cache/fx-rewrite/kernels; a temporary directory if that
    cannot be created."""
    env = os.environ.get("FXREWRITE_CACHE_DIR")
    base = Path(env) if env else Path.home() / ".cache" / "fx-rewrite" / "kernels"
    try:
        base.mkdir(parents=True, exist_ok=True)
        return base
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "fx-rewrite-kernels"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


class KernelCache(LRU):
    """Loaded kernels by structural key (`get`), bounded; `load` writes and imports one."""

    def __init__(self, maxsize: int = CACHE_SIZE):
        super().__init__(maxsize, on_evict=self._unload)
        self._modules: dict[str, str] = {}  # key -> the name of the module it was loaded as

    def _unload(self, key, kernel) -> None:
        sys.modules.pop(self._modules.pop(key, ""), None)

    def load(self, key: str, name: str, source: str):
        """The function `name` of the module `source`, written to `<name>_<key>_<source hash>.py`
        in the cache directory (unless already there) and imported; cached under `key`."""
        digest = hashlib.sha256(source.encode()).hexdigest()[:12]
        path = cache_dir() / f"{name.strip('_')}_{key}_{digest}.py"
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(source)
            os.replace(tmp, path)
        modname = f"fxrewrite_kernels.{path.stem}"
        mod_spec = importlib.util.spec_from_file_location(modname, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[modname] = module
        mod_spec.loader.exec_module(module)
        fn = getattr(module, name)
        self._modules[key] = modname
        self.put(key, fn)
        return fn
