"""Load/unload/ready state per model version; owns each version's backend and batcher.

Loading is slow and blocking (ONNX Runtime sessions, TensorRT engine builds), so it runs in a worker
thread; the event loop keeps serving other models meanwhile. A reload loads the new versions first
and swaps them in, then drains the old batchers, so in-flight requests finish on the old instances.
A reload that fails keeps the serving versions in place (Triton's rule); the load RPC reports the error.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import pathlib
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from trtserve.protos import model_config_pb2 as mc
from trtserve.server.engine.backends import BackendFactory, create_backend
from trtserve.server.engine.backends.base import Backend, BackendConfig, TensorSpec
from trtserve.server.engine.batcher.scheduler import DynamicBatcher
from trtserve.server.errors import ModelLoadError, NotFound, TrtServeError, Unavailable
from trtserve.server.events import Observer
from trtserve.server.engine.repository import config_check, layout, pbtxt
from trtserve.server.engine.repository.model_config import ModelSpec, batches_per_instance

log = logging.getLogger("trtserve.repository")


@dataclasses.dataclass
class ModelVersion:
    """One loaded (or failed) model version."""

    name: str
    version: str
    state: str  # LOADING, READY, UNLOADING, UNAVAILABLE
    reason: str = ""
    spec: Optional[ModelSpec] = None
    config: Optional[mc.ModelConfig] = None  # complete config, as the ModelConfig RPC returns it
    backend: Optional[Backend] = None
    batcher: Optional[DynamicBatcher] = None
    # new with every load: a front end names the serial it checked a request against, so a request checked
    # against a version that a reload has since replaced is checked again (engine/single_path.py, group_path.py)
    serial: int = 0


def _specs(config: mc.ModelConfig, group) -> Tuple[TensorSpec, ...]:
    from trtserve import dtypes

    return tuple(TensorSpec(t.name, dtypes.BY_CONFIG[mc.DataType.Name(t.data_type)].wire, tuple(t.dims),
                            getattr(t, "optional", False)) for t in group)


class ModelRepository:
    """The set of models served from one repository folder."""

    def __init__(self, root: pathlib.Path, observer: Observer, cache_dir: Optional[pathlib.Path] = None,
                 drain_seconds: float = 30.0, backend_factories: Optional[Mapping[str, BackendFactory]] = None,
                 lenient_config: bool = False) -> None:
        self.root = root
        self.lenient_config = lenient_config  # config fields trtserve does not implement: warn instead of refuse
        self._warned: set = set()  # (model, field) already warned about
        # models that should be loaded (loaded at start or by the load RPC, not unloaded since): strict readiness
        # asks every one of them to be READY (Triton's rule; a version unloaded on purpose does not count)
        self._wanted: set = set()
        self._factories = dict(backend_factories or {})
        self._observer = observer
        self._cache_dir = cache_dir
        self._drain_seconds = drain_seconds
        self._models: Dict[str, Dict[str, ModelVersion]] = {}
        self._reasons: Dict[str, str] = {}  # model-level load failure (e.g. bad config.pbtxt)
        self._locks: Dict[str, asyncio.Lock] = {}
        self._serials = itertools.count(1)
        # layout.stamp() of each model as its last load (or failed load) found it: what poll() compares
        self._stamps: Dict[str, Tuple[tuple, Dict[str, tuple]]] = {}
        self.inline_batches = False  # see DynamicBatcher(inline=): set by the engine process

    # ---- queries ----------------------------------------------------------------------------
    def get(self, name: str, version: str = "") -> ModelVersion:
        """The ready version asked for (latest ready when ``version`` is empty)."""
        versions = self._models.get(name)
        if not versions:
            if name in self._reasons:
                raise Unavailable(f"model '{name}' is not ready: {self._reasons[name]}")
            raise NotFound(f"model '{name}' is not loaded" + (
                " (it is in the repository: load it first)" if _in_repository(self.root, name) else ""))
        if version:
            mv = versions.get(version)
            if mv is None:
                raise NotFound(f"model '{name}' has no version {version!r}; loaded versions: "
                               f"{sorted(versions, key=_vkey)}")
            if mv.state != "READY":
                raise Unavailable(f"model '{name}' version {version} is not ready ({mv.state}"
                                  f"{': ' + mv.reason if mv.reason else ''})")
            return mv
        ready = [v for v in versions.values() if v.state == "READY"]
        if not ready:
            states = ", ".join(f"{v.version}: {v.state}{' (' + v.reason + ')' if v.reason else ''}"
                               for v in versions.values())
            raise Unavailable(f"model '{name}' is not ready: no version is ready ({states})")
        return max(ready, key=lambda v: _vkey(v.version))

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
            return True
        except TrtServeError:
            return False

    def versions(self, name: str) -> List[ModelVersion]:
        if name not in self._models:
            raise NotFound(f"model '{name}' is not loaded")
        return sorted(self._models[name].values(), key=lambda v: _vkey(v.version))

    def loaded(self) -> List[ModelVersion]:
        return [v for name in sorted(self._models) for v in self.versions(name)]

    def index(self) -> List[Tuple[str, str, str, str]]:
        """(name, version, state, reason) for every model in the repository folder or loaded."""
        rows = []
        for name in sorted(set(layout.model_names(self.root)) | set(self._models) | set(self._reasons)):
            if name in self._models:
                rows.extend((name, v.version, v.state, v.reason) for v in self.versions(name))
            elif name in self._reasons:
                rows.append((name, "", "UNAVAILABLE", self._reasons[name]))
            else:
                rows.append((name, "", "", ""))
        return rows

    # ---- load / unload ----------------------------------------------------------------------
    def all_ready(self) -> bool:
        """Whether every model that should be loaded has all its versions READY (strict readiness)."""
        for name in self._wanted:
            if name in self._reasons or not self._models.get(name):
                return False
            if any(v.state != "READY" for v in self._models[name].values()):
                return False
        return True

    async def load_all(self, names: Optional[List[str]] = None) -> List[Tuple[str, str]]:
        """Loads every model of the repository (or those named); (name, reason) of each that failed."""
        failed = []
        for name in layout.model_names(self.root) if names is None else names:
            try:
                await self.load(name)
            except TrtServeError as e:
                log.error("model '%s' failed to load: %s", name, e.message)
                failed.append((name, e.message))
        return failed

    async def load(self, name: str, config_json: Optional[str] = None, reuse_unchanged: bool = False) -> None:
        """Loads (or reloads) every version the model's version policy selects. ``config_json``: the load RPC's
        config override (a ModelConfig in JSON, instead of config.pbtxt). ``reuse_unchanged`` (repository poll):
        a READY version whose folder and model files are as the last load found them keeps serving as it is."""
        model_path = layout.model_dir(self.root, name)
        override = pbtxt.config_from_json(name, config_json) if config_json is not None else None
        self._wanted.add(name)
        async with self._lock(name):
            t0 = time.monotonic()
            loop = asyncio.get_running_loop()
            previous = self._stamps.get(name)
            stamp = await loop.run_in_executor(None, layout.stamp, model_path)
            self._stamps[name] = stamp
            try:
                base = pbtxt.read_config(model_path) if override is None else override
                wanted = [str(v) for v in layout.select_versions(layout.available_versions(model_path),
                                                                  base.version_policy if base.HasField(
                                                                      "version_policy") else None)]
                if not wanted:
                    raise ModelLoadError(f"model '{name}': no version folder (e.g. {model_path}/1/) matches its "
                                         "version policy")
            except TrtServeError as e:
                self._reasons[name] = e.message
                raise
            self._reasons.pop(name, None)
            old = self._models.get(name, {})
            new: Dict[str, ModelVersion] = {}
            errors = []
            for v in wanted:
                if (reuse_unchanged and override is None and previous is not None and previous[0] == stamp[0]
                        and v in old and old[v].state == "READY" and previous[1].get(v) == stamp[1].get(v)):
                    new[v] = old[v]  # unchanged: keeps serving, no new instance
                    continue
                self._observer.model_state(name, v, "LOADING")
                mv = ModelVersion(name, v, "LOADING")
                try:
                    spec, config, backend = await loop.run_in_executor(
                        None, self._open_version, model_path, base, v)
                except TrtServeError as e:
                    mv.state, mv.reason = "UNAVAILABLE", e.message
                    errors.append(e)
                except Exception as e:  # an unexpected loader failure is reported like a load error
                    log.exception("model '%s' version %s failed to load", name, v)
                    mv.state, mv.reason = "UNAVAILABLE", f"{type(e).__name__}: {e}"
                    errors.append(ModelLoadError(f"model '{name}' version {v}: {mv.reason}"))
                else:
                    mv.spec, mv.config, mv.backend, mv.state = spec, config, backend, "READY"
                    mv.serial = next(self._serials)
                    mv.batcher = DynamicBatcher(spec, backend, self._observer, inline=self.inline_batches)
                    mv.batcher.start()
                self._observer.model_state(name, v, mv.state, time.monotonic() - t0)
                new[v] = mv
            if errors:
                new = self._keep_serving(name, old, new)
            self._models[name] = new
            await self._retire([mv for v, mv in old.items() if new.get(v) is not mv])
            if errors:
                raise errors[0]

    @staticmethod
    def _keep_serving(name: str, old: Dict[str, ModelVersion],
                      new: Dict[str, ModelVersion]) -> Dict[str, ModelVersion]:
        """Triton's rule for a reload that fails: the serving versions stay. A version whose new copy
        failed keeps its old ready instance; old ready versions the policy no longer selects are kept
        too (a reload that fails must not leave less serving than before). Versions that loaded fine
        replace theirs. A first load (nothing ready before) keeps its failed versions, as reported."""
        kept = dict(new)
        for v, mv in old.items():
            if mv.state == "READY" and (v not in new or new[v].state != "READY"):
                if v in new:
                    log.warning("model '%s' version %s failed to reload (%s); the loaded instance keeps serving",
                                name, v, new[v].reason)
                kept[v] = mv
        return kept

    async def unload(self, name: str) -> None:
        if name not in self._models and name not in self._reasons:
            raise NotFound(f"model '{name}' is not loaded")
        self._wanted.discard(name)
        async with self._lock(name):
            self._reasons.pop(name, None)
            old = list(self._models.pop(name, {}).values())
            await self._retire(old)

    async def poll(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """One scan of the repository (model control mode poll): loads added models, reloads changed ones (a
        config or version folder that changed, a version added or removed: new instances first, then the old
        ones drain) and unloads removed models once their requests finish. A model that fails keeps what it
        served and is tried again when its files change."""
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, self._scan)
        for name in sorted(set(self._stamps) - set(found)):
            if stopping():
                return
            self._stamps.pop(name, None)
            if name in self._models or name in self._reasons:
                log.info("model '%s' was removed from the repository: unloading it", name)
                await self.unload(name)
        for name, stamp in sorted(found.items()):
            if stopping():
                return
            if self._stamps.get(name) == stamp:
                continue
            log.info("model '%s' %s in the repository: loading it", name,
                     "changed" if name in self._stamps else "appeared")
            try:
                await self.load(name, reuse_unchanged=True)
            except TrtServeError as e:
                model_path = layout.model_dir(self.root, name)
                if name in self._models and not await loop.run_in_executor(None, layout.available_versions,
                                                                           model_path):
                    # Triton's rule: a model with no version folder left is unloaded (its requests finish)
                    log.info("model '%s' has no version left in the repository: unloading it", name)
                    await self.unload(name)
                    continue
                log.error("model '%s' failed to load: %s", name, e.message)

    def _scan(self) -> Dict[str, Tuple[tuple, Dict[str, tuple]]]:
        """Blocking: {model name: layout.stamp} of the repository folder."""
        try:
            if not self.root.is_dir():
                raise OSError("not a folder any more")
            names = layout.model_names(self.root)
        except OSError as e:  # the folder went away (or is being replaced): nothing is unloaded for it
            log.error("cannot scan the model repository %s: %s", self.root, e)
            return {name: self._stamps[name] for name in self._stamps}
        return {name: layout.stamp(self.root / name) for name in names}

    async def close(self) -> None:
        for name in list(self._models):
            await self.unload(name)

    async def _retire(self, versions: List[ModelVersion]) -> None:
        """Stops old versions: queued and running requests finish (up to the drain time)."""
        for mv in versions:
            self._observer.model_state(mv.name, mv.version, "UNLOADING")
            if mv.batcher is not None:
                await mv.batcher.stop(self._drain_seconds)
            if mv.backend is not None:
                await asyncio.get_running_loop().run_in_executor(None, mv.backend.close)
            mv.state = "UNAVAILABLE"
            mv.reason = "unloaded"
            self._observer.model_state(mv.name, mv.version, "UNAVAILABLE")

    def _lock(self, name: str) -> asyncio.Lock:
        if name not in self._locks:
            self._locks[name] = asyncio.Lock()
        return self._locks[name]

    def _open_version(self, model_path: pathlib.Path, base: mc.ModelConfig,
                      version: str) -> Tuple[ModelSpec, mc.ModelConfig, Backend]:
        """Blocking: builds the backend, auto-completes and checks the config, validates the spec."""
        config = mc.ModelConfig()
        config.CopyFrom(base)
        vdir = model_path / version
        config.platform = pbtxt.guess_platform(config, vdir)
        self._check_config(config)
        count = sum(max(1, g.count) for g in config.instance_group) if config.instance_group else 1
        params = {k: v.string_value for k, v in config.parameters.items()}
        bcfg = BackendConfig(
            name=config.name, version=version, model_dir=vdir, default_model_filename=config.default_model_filename,
            max_batch_size=config.max_batch_size, inputs=_specs(config, config.input),
            outputs=_specs(config, config.output), instance_count=count,
            parameters=params, cuda_graphs=bool(config.optimization.cuda.graphs), cache_dir=self._cache_dir,
            batches_per_instance=batches_per_instance(config.name, params),
        )
        backend = create_backend(config.platform, bcfg, self._factories)
        backend.open()
        try:
            inputs, outputs = backend.io()
            if not config.input and not config.output:
                pbtxt.autocomplete(config, inputs, outputs, None)
            else:
                pbtxt.check_against_model(config, inputs, outputs)
            if not config.instance_group:
                config.instance_group.add(count=count, kind=mc.ModelInstanceGroup.KIND_CPU
                                          if config.platform == "onnxruntime_onnx" else mc.ModelInstanceGroup.KIND_GPU)
            spec = ModelSpec.from_proto(config, version, model_path)
            _warm_up(config, spec, backend)
        except BaseException:
            backend.close()
            raise
        return spec, config, backend


    def _check_config(self, config: mc.ModelConfig) -> None:
        """Refuses config fields trtserve does not implement (or warns once per field, lenient), and warns
        once about tuning hints it ignores; either way the field is dropped from the config served back."""
        refused, ignored = config_check.check(config, config.platform, _gpu_count, tuple(self._factories))
        if refused and not self.lenient_config:
            path, why, _ = refused[0]
            more = f" (and {len(refused) - 1} more unsupported field{'s' if len(refused) > 2 else ''}: " \
                   f"{', '.join(f[0] for f in refused[1:])})" if len(refused) > 1 else ""
            raise ModelLoadError(f"model '{config.name}': config.pbtxt field '{path}' is not supported: {why}{more} "
                                 "(--lenient-config loads the model without it)")
        for path, why, clear in refused + ignored:
            if (config.name, path) not in self._warned:
                self._warned.add((config.name, path))
                log.warning("model '%s': config.pbtxt field '%s' is ignored: %s", config.name, path, why)
            clear()


def _gpu_count() -> Optional[int]:
    """CUDA devices visible to this process (0 without CUDA; None when it cannot be told)."""
    try:
        import cupy  # noqa: PLC0415

        return int(cupy.cuda.runtime.getDeviceCount())
    except ImportError:
        return 0
    except Exception:  # noqa: BLE001 - no driver, no device: CUDA errors share no importable base class
        return 0


def _in_repository(root: pathlib.Path, name: str) -> bool:
    """Whether ``name`` is a model folder of the repository; "", "..", "../x" are not (so a request
    cannot probe folders outside the repository, and a 300-byte name is not an OSError)."""
    try:
        layout.model_dir(root, name)
    except NotFound:
        return False
    return True


def _warm_up(config: mc.ModelConfig, spec: ModelSpec, backend: Backend) -> None:
    """Runs config.pbtxt's ``model_warmup`` samples on every instance before the model reports READY
    (Triton's rule: first requests must not pay for lazy initialisation)."""
    import numpy as np

    from trtserve import dtypes

    rng = np.random.default_rng(0)
    for w in config.model_warmup:
        rows = max(1, w.batch_size)
        inputs = {}
        for name, sample in w.inputs.items():
            t = spec.input(name)
            if t is None:
                raise ModelLoadError(f"model '{spec.name}': model_warmup '{w.name}' names unknown input '{name}'")
            dt = dtypes.BY_CONFIG[mc.DataType.Name(sample.data_type)]
            shape = ((rows,) if spec.batches else ()) + tuple(sample.dims)
            if sample.WhichOneof("input_data_type") == "input_data_file":
                raw = (backend.config.model_dir.parent / "warmup" / sample.input_data_file).read_bytes()
                arr = np.frombuffer(raw, dtype=dt.numpy).reshape(shape)
            elif sample.WhichOneof("input_data_type") == "random_data" and dt.numpy.kind in "fiu":
                arr = (rng.random(shape) * 2).astype(dt.numpy)
            else:
                arr = np.zeros(shape, dtype=dt.numpy) if dt.wire != "BYTES" else np.full(shape, b"", dtype=object)
            inputs[name] = arr
        outputs = tuple(t.name for t in spec.outputs)
        for instance in range(backend.instance_count()):
            for _ in range(max(1, w.count)):
                try:
                    backend.run(instance, inputs, outputs)
                except Exception as e:  # a model that cannot run its own warm-up sample is not ready
                    raise ModelLoadError(f"model '{spec.name}': model_warmup '{w.name}' failed on instance "
                                         f"{instance}: {e}") from None


def _vkey(v: str) -> int:
    return int(v) if v.isdigit() else -1
