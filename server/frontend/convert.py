"""Internal state -> response messages (metadata, statistics, index); no logic beyond field mapping."""
from __future__ import annotations

from typing import Iterable

from trtserve.protos import grpc_service_pb2 as pb
from trtserve.server.metrics.statistics import Duration, VersionStats
from trtserve.server.engine.repository.registry import ModelVersion


def model_metadata(name: str, versions: Iterable[ModelVersion]) -> pb.ModelMetadataResponse:
    ready = [v for v in versions if v.state == "READY" and v.spec is not None]
    latest = ready[-1]
    spec = latest.spec
    assert spec is not None
    batch = [-1] if spec.batches else []
    return pb.ModelMetadataResponse(
        name=name, versions=[v.version for v in ready], platform=spec.platform,
        inputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=batch + list(t.dims))
                for t in spec.inputs],
        outputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype,
                                                         shape=batch + list(t.dims)) for t in spec.outputs],
    )


def _dur(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(name: str, version: str, s: VersionStats) -> pb.ModelStatistics:
    out = pb.ModelStatistics(
        name=name, version=version, last_inference=s.last_inference_ms, inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_dur(s.success), fail=_dur(s.fail), queue=_dur(s.queue), compute_input=_dur(s.compute_input),
            compute_infer=_dur(s.compute_infer), compute_output=_dur(s.compute_output),
        ),
    )
    for size in sorted(s.batches):
        b = s.batches[size]
        out.batch_stats.add(batch_size=size, compute_input=_dur(b.compute_input),
                            compute_infer=_dur(b.compute_infer), compute_output=_dur(b.compute_output))
    return out
