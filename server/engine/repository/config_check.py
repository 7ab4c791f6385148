"""Which config.pbtxt fields trtserve implements: every field Triton's schema allows is either honoured,
refused (the model fails to load with a message naming the field), or a tuning hint ignored with one warning.

A refused field changes what a model computes, returns or how it is scheduled (sequence batching, ensembles,
decoupled responses, the response cache, reshapes, ...): serving the model without it
would answer differently from Triton without a word. ``--lenient-config`` (ServerOptions.lenient_config)
turns each refusal into one logged warning per model and field, and the field is dropped from the config the
ModelConfig RPC returns, for people migrating a repository. docs/model-config.md is the table of every field.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

from trtserve.protos import model_config_pb2 as mc

# (field path, why) -> clears it from the config; ``refused`` are load errors unless lenient, ``ignored`` always
# only warn
Finding = Tuple[str, str, Callable[[], None]]

CPU_PLATFORMS = ("onnxruntime_onnx",)
KNOWN_BACKENDS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}


def _clear(msg, field: str) -> Callable[[], None]:
    return lambda: msg.ClearField(field)


def check(config: mc.ModelConfig, platform: str, gpu_count: Callable[[], Optional[int]],
          extra_platforms: Tuple[str, ...] = ()) -> Tuple[List[Finding], List[Finding]]:
    """(refused, ignored) findings for ``config`` served on ``platform``. ``gpu_count()`` is the number of
    CUDA devices (None when unknown); it is only asked when a GPU is named."""
    refused: List[Finding] = []
    ignored: List[Finding] = []

    def refuse(path: str, why: str, clear: Callable[[], None]) -> None:
        refused.append((path, why, clear))

    def ignore(path: str, why: str, clear: Callable[[], None]) -> None:
        ignored.append((path, why, clear))

    if config.backend and config.backend not in KNOWN_BACKENDS and config.backend not in extra_platforms:
        refuse("backend", f"backend '{config.backend}' is not available in trtserve (it serves "
               f"{', '.join(sorted(KNOWN_BACKENDS))})", _clear(config, "backend"))
    if config.runtime:
        refuse("runtime", "custom backend runtimes are not supported", _clear(config, "runtime"))
    scheduling = config.WhichOneof("scheduling_choice")
    if scheduling == "sequence_batching":
        refuse("sequence_batching", "sequence batching (stateful models) is not implemented",
               _clear(config, "sequence_batching"))
    elif scheduling == "ensemble_scheduling":
        refuse("ensemble_scheduling", "ensembles are not implemented", _clear(config, "ensemble_scheduling"))
    if config.HasField("model_transaction_policy") and config.model_transaction_policy.decoupled:
        refuse("model_transaction_policy.decoupled", "decoupled models (several or no responses per request) are "
               "not implemented", _clear(config, "model_transaction_policy"))
    if config.HasField("response_cache") and config.response_cache.enable:
        refuse("response_cache", "the response cache is not implemented", _clear(config, "response_cache"))
    if config.HasField("model_repository_agents") and config.model_repository_agents.agents:
        refuse("model_repository_agents", "repository agents are not implemented",
               _clear(config, "model_repository_agents"))
    if config.HasField("model_operations") and config.model_operations.op_library_filename:
        refuse("model_operations.op_library_filename", "custom operation libraries are not loaded",
               _clear(config, "model_operations"))
    if config.cc_model_filenames:
        refuse("cc_model_filenames", "choosing the model file by compute capability is not implemented "
               "(use default_model_filename)", _clear(config, "cc_model_filenames"))
    if config.batch_input:
        refuse("batch_input", "batch inputs are not implemented", _clear(config, "batch_input"))
    if config.batch_output:
        refuse("batch_output", "batch outputs are not implemented", _clear(config, "batch_output"))
    for kind, group in (("input", config.input), ("output", config.output)):
        for t in group:
            where = f"{kind} '{t.name}'"
            if t.HasField("reshape"):
                refuse(f"{kind}.reshape", f"{where}: reshape is not implemented", _clear(t, "reshape"))
            if t.is_shape_tensor:
                refuse(f"{kind}.is_shape_tensor", f"{where}: shape tensors are not implemented",
                       _clear(t, "is_shape_tensor"))
            if t.is_non_linear_format_io:
                refuse(f"{kind}.is_non_linear_format_io", f"{where}: non-linear I/O formats are not implemented",
                       _clear(t, "is_non_linear_format_io"))
            if kind == "input" and t.allow_ragged_batch:
                refuse("input.allow_ragged_batch", f"{where}: ragged batching is not implemented (see the "
                       "trtserve.pad.<INPUT> parameter)", _clear(t, "allow_ragged_batch"))
    gpus_known: List[Optional[int]] = []  # gpu_count() asked at most once

    def devices() -> Optional[int]:
        if not gpus_known:
            gpus_known.append(gpu_count())
        return gpus_known[0]

    known_platform = platform in CPU_PLATFORMS or platform == "tensorrt_plan"
    for g in config.instance_group:
        where = f"instance_group '{g.name}'" if g.name else "instance_group"
        if g.HasField("rate_limiter"):
            refuse("instance_group.rate_limiter", f"{where}: the rate limiter is not implemented",
                   _clear(g, "rate_limiter"))
        if g.secondary_devices:
            refuse("instance_group.secondary_devices", f"{where}: secondary devices are not implemented",
                   _clear(g, "secondary_devices"))
        if g.profile:
            refuse("instance_group.profile", f"{where}: per-instance TensorRT profiles are not implemented (see "
                   "the trtserve.profiles parameter)", _clear(g, "profile"))
        if g.passive:
            refuse("instance_group.passive", f"{where}: passive instances are not implemented", _clear(g, "passive"))
        if g.host_policy:
            refuse("instance_group.host_policy", f"{where}: host policies are not implemented",
                   _clear(g, "host_policy"))
        if not known_platform:
            continue
        if g.kind == mc.ModelInstanceGroup.KIND_MODEL:
            refuse("instance_group.kind", f"{where}: KIND_MODEL is not implemented", _clear(g, "kind"))
        elif platform in CPU_PLATFORMS and (g.kind == mc.ModelInstanceGroup.KIND_GPU or g.gpus):
            refuse("instance_group.kind" if not g.gpus else "instance_group.gpus",
                   f"{where}: {'gpus ' + str(list(g.gpus)) if g.gpus else 'KIND_GPU'} on platform {platform}, "
                   "which trtserve runs on the CPU only (use KIND_CPU or KIND_AUTO)",
                   lambda g=g: (g.ClearField("gpus"), g.ClearField("kind")))
        elif platform == "tensorrt_plan" and g.kind == mc.ModelInstanceGroup.KIND_CPU:
            refuse("instance_group.kind", f"{where}: KIND_CPU on platform tensorrt_plan (TensorRT runs on a GPU)",
                   _clear(g, "kind"))
        elif g.gpus:
            n = devices()
            missing = [d for d in g.gpus if d < 0 or (n is not None and d >= n)]
            if missing:
                refuse("instance_group.gpus", f"{where}: gpus {list(g.gpus)} name GPU {missing[0]}, but "
                       f"{n if n is not None else 'no'} CUDA device{'' if n == 1 else 's'} "
                       f"{'is' if n == 1 else 'are'} visible", _clear(g, "gpus"))
            elif any(d != 0 for d in g.gpus):
                refuse("instance_group.gpus", f"{where}: gpus {list(g.gpus)}: trtserve runs every instance on "
                       "GPU 0 of the devices it sees (choose it with CUDA_VISIBLE_DEVICES)", _clear(g, "gpus"))
    if config.HasField("optimization"):
        opt = config.optimization
        if opt.HasField("execution_accelerators") and (opt.execution_accelerators.gpu_execution_accelerator or
                                                       opt.execution_accelerators.cpu_execution_accelerator):
            refuse("optimization.execution_accelerators", "execution accelerators are not implemented",
                   _clear(opt, "execution_accelerators"))
        for field, why in (("graph", "graph optimization levels are not applied"),
                           ("priority", "model priorities are not applied"),
                           ("input_pinned_memory", "trtserve decides itself where inputs are page-locked"),
                           ("output_pinned_memory", "trtserve decides itself where outputs are page-locked"),
                           ("gather_kernel_buffer_threshold", "the gather kernel is not used"),
                           ("eager_batching", "eager batching is not implemented")):
            if opt.HasField(field) if field in ("graph", "input_pinned_memory", "output_pinned_memory") else \
                    bool(getattr(opt, field)):
                ignore(f"optimization.{field}", why, _clear(opt, field))
        if opt.HasField("cuda"):
            for field, why in (("busy_wait_events", "not applied"), ("output_copy_stream", "not applied"),
                               ("graph_spec", "CUDA graphs are captured for trtserve's own shapes (docs/tensorrt.md)")):
                value = getattr(opt.cuda, field)
                if (len(value) if field == "graph_spec" else value):
                    ignore(f"optimization.cuda.{field}", why, _clear(opt.cuda, field))
    if config.metric_tags:
        ignore("metric_tags", "metrics carry only Triton's model and version labels", _clear(config, "metric_tags"))
    if config.HasField("model_metrics"):
        ignore("model_metrics", "per-model metric settings are not applied", _clear(config, "model_metrics"))
    return refused, ignored
