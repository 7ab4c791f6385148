"""Property-based tests (hypothesis) over the pure parts a client can reach: request decoding,
BYTES (de)serialization, and the batcher's shape/plan/assemble logic. A few hundred examples each,
so the module stays fast; bench/fuzz.py runs the same properties with far more examples.
"""
from __future__ import annotations

import math
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trtserve import dtypes
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.server.engine.backends.base import Profile, ShapeRange
from trtserve.server.engine.batcher import assemble, policy
from trtserve.server.engine.batcher.request import Pending
from trtserve.server.engine.batcher.shapes import ShapeRules
from trtserve.server.errors import InvalidArgument
from tests import reference_codec
from trtserve.server.engine.repository.model_config import BatchingPolicy

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WIRES = list(dtypes.BY_WIRE)
FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents", "fp32_contents",
          "fp64_contents", "bytes_contents")
FIELD_VALUES = {
    "bool_contents": st.booleans(), "int_contents": st.integers(-(1 << 31), (1 << 31) - 1),
    "int64_contents": st.integers(-(1 << 63), (1 << 63) - 1), "uint_contents": st.integers(0, (1 << 32) - 1),
    "uint64_contents": st.integers(0, (1 << 64) - 1),
    "fp32_contents": st.floats(width=32, allow_nan=True), "fp64_contents": st.floats(allow_nan=True),
    "bytes_contents": st.binary(max_size=8),
}

def _objects(items) -> np.ndarray:
    arr = np.empty(len(items), object)
    arr[:] = items
    return arr


# ---- request decoding ------------------------------------------------------------------------------
dims = st.one_of(st.integers(-2, 4), st.sampled_from([0, 1 << 20, 1 << 31, (1 << 63) - 1]))


@st.composite
def tensors(draw):
    """One input as (name, datatype, shape, data) with data ('raw', bytes) | ('typed', field, values) | None."""
    name = draw(st.sampled_from(["INPUT0", "INPUT1", "", "x" * 3]))
    datatype = draw(st.one_of(st.sampled_from(WIRES), st.sampled_from(["fp32", "", "TYPE_FP32", "FP8"])))
    shape = draw(st.lists(dims, max_size=4))
    count = math.prod(shape) if shape and all(d >= 0 for d in shape) else (1 if not shape else -1)
    kind = draw(st.sampled_from(["raw-exact", "raw-random", "typed-exact", "typed-random", "none"]))
    dt = dtypes.BY_WIRE.get(datatype)
    small = 0 <= count <= 64
    if kind == "raw-exact" and dt is not None and small:
        if dt.wire == "BYTES":
            items = draw(st.lists(st.binary(max_size=6), min_size=count, max_size=count))
            return name, datatype, shape, ("raw", dtypes.serialize_bytes(_objects(items)))
        return name, datatype, shape, ("raw", draw(st.binary(min_size=count * dt.itemsize,
                                                              max_size=count * dt.itemsize)))
    if kind in ("raw-exact", "raw-random"):
        return name, datatype, shape, ("raw", draw(st.binary(max_size=80)))
    if kind == "typed-exact" and dt is not None and dt.contents_field and small:
        field = dt.contents_field
        return name, datatype, shape, ("typed", field, draw(st.lists(FIELD_VALUES[field], min_size=count,
                                                                     max_size=count)))
    if kind in ("typed-exact", "typed-random"):
        field = draw(st.sampled_from(FIELDS))
        return name, datatype, shape, ("typed", field, draw(st.lists(FIELD_VALUES[field], max_size=8)))
    return name, datatype, shape, None


@st.composite
def infer_requests(draw):
    r = pb.ModelInferRequest(model_name="m")
    items = draw(st.lists(tensors(), max_size=3))
    extra_raw = draw(st.integers(-1, 1))  # raw entries: one per raw input, one fewer, one more
    raws = []
    for name, datatype, shape, data in items:
        t = r.inputs.add(name=name, datatype=datatype, shape=shape)
        if data is None:
            raws.append(b"")
        elif data[0] == "raw":
            raws.append(data[1])
        else:
            getattr(t.contents, data[1]).extend(data[2])
            raws.append(b"")
        if draw(st.booleans()) and draw(st.booleans()):
            t.parameters["shared_memory_region"].string_param = "r"
    if any(d is not None and d[0] == "raw" for *_, d in items):
        raws = raws[:max(0, len(raws) + min(0, extra_raw))] + ([b"\0"] if extra_raw > 0 else [])
        r.raw_input_contents.extend(raws)
    return r


def _check_decoded(request: pb.ModelInferRequest) -> None:
    try:
        arrays, types = reference_codec.decode_inputs(request)
    except InvalidArgument as e:
        assert e.message  # a message, naming the problem
        return
    assert list(arrays) == [t.name for t in request.inputs]  # one array per input, in order, no duplicates
    raw = list(request.raw_input_contents)
    for i, t in enumerate(request.inputs):
        dt = dtypes.BY_WIRE[t.datatype]
        a = arrays[t.name]
        assert types[t.name] == t.datatype
        assert a.shape == tuple(t.shape) and a.dtype == dt.numpy
        if raw:  # raw data round-trips exactly
            assert (dtypes.serialize_bytes(a) if dt.wire == "BYTES" else a.astype(dt.numpy.newbyteorder("<"))
                    .tobytes()) == raw[i]
        elif a.size:  # typed data: same values
            values = list(getattr(t.contents, dt.contents_field))
            if dt.wire == "BYTES":
                assert list(a.reshape(-1)) == values
            elif dt.numpy.kind in "iub":
                assert a.reshape(-1).tolist() == [dt.numpy.type(v).item() for v in values]


@FAST
@given(infer_requests())
def test_decode_inputs_returns_consistent_arrays_or_invalid_argument(request):
    _check_decoded(request)


@FAST
@given(st.sampled_from(WIRES), st.lists(st.integers(0, 3), min_size=1, max_size=3), st.binary(max_size=64))
def test_decode_raw_of_any_bytes(datatype, shape, raw):
    r = pb.ModelInferRequest(model_name="m")
    r.inputs.add(name="INPUT0", datatype=datatype, shape=shape)
    r.raw_input_contents.append(raw)
    _check_decoded(r)


# ---- BYTES serialization ---------------------------------------------------------------------------------
@FAST
@given(st.lists(st.binary(max_size=40), max_size=20), st.sampled_from([(-1,), "2d"]))
def test_bytes_round_trip(items, layout):
    arr = _objects(items)
    if layout == "2d" and len(items) % 2 == 0:
        arr = arr.reshape(2, -1)
    wire = dtypes.serialize_bytes(arr)
    assert len(wire) == 4 * len(items) + sum(len(i) for i in items)
    back = dtypes.deserialize_bytes(wire, len(items))
    assert list(back) == items


@FAST
@given(st.lists(st.text(max_size=10), max_size=10))
def test_str_elements_serialize_as_utf8(texts):
    arr = _objects(texts)
    back = dtypes.deserialize_bytes(dtypes.serialize_bytes(arr), len(texts))
    assert [b.decode("utf-8") for b in back] == texts


@FAST
@given(st.binary(max_size=64), st.one_of(st.integers(0, 20), st.sampled_from([1 << 30, 1 << 40])))
def test_bytes_deserialize_of_garbage_is_exact_or_value_error(buf, count):
    try:
        out = dtypes.deserialize_bytes(buf, count)
    except ValueError as e:
        assert "BYTES" in str(e)
        return
    assert out.shape == (count,) and dtypes.serialize_bytes(out) == buf  # consumed exactly, nothing invented


# ---- batcher: plan, shapes, assemble -----------------------------------------------------------------------
@st.composite
def batching_cases(draw):
    max_batch = draw(st.integers(1, 8))
    paddable = draw(st.booleans())
    profiles = ()
    if draw(st.booleans()):
        n = draw(st.integers(1, 3))
        profs = []
        for k in range(n):
            max_rows = draw(st.integers(1, max_batch))
            lo = draw(st.integers(1, 4))
            hi = draw(st.integers(lo, 8))
            instances = tuple(sorted(draw(st.sets(st.integers(0, 2), min_size=1, max_size=2))))
            profs.append(Profile(k, {"x": ShapeRange((1, lo), (max_rows, hi), (max_rows, hi))}, instances))
        profiles = tuple(profs)
    rules = ShapeRules(batches=True, max_batch_size=max_batch, paddable=frozenset({"x"} if paddable else ()),
                       profiles=profiles)
    pol = BatchingPolicy(enabled=draw(st.booleans()), max_batch_size=max_batch,
                         preferred_batch_sizes=tuple(sorted(draw(st.sets(st.integers(1, max_batch), max_size=2)))),
                         max_queue_delay_us=draw(st.sampled_from([0, 100, 10_000])))
    pending = []
    for i in range(draw(st.integers(0, 8))):
        rows = draw(st.integers(1, max_batch))
        length = draw(st.integers(1, 6))
        members = draw(st.integers(1, min(4, rows)))  # above 1: an entry standing for alike requests
        rows -= rows % members
        if rules.accepts(rows, {"x": (length,)}):  # submit() rejects the others before they queue
            r = Pending(inputs={}, outputs=("y",), rows=rows, shapes={"x": (length,)}, level=1,
                        arrival=draw(st.floats(0, 0.02)), ticket=None, seq=i)  # type: ignore[arg-type]
            if members > 1:
                r.count = members
                r.splitter = (lambda t, k: None) if draw(st.booleans()) else None  # type: ignore[assignment]
            pending.append(r)
    free = draw(st.sets(st.integers(0, 2), max_size=3))
    queueable = draw(st.sets(st.integers(0, 2), max_size=3)) - free
    return rules, pol, pending, free, queueable, draw(st.booleans()), draw(st.floats(0, 0.05))


@FAST
@given(batching_cases())
def test_plan_respects_max_batch_profiles_and_never_splits_a_request(case):
    rules, pol, pending, free, queueable, busy, now = case
    p = policy.plan(pending, now, pol, rules, free, busy, queueable)
    if not p.requests:
        assert p.wait_s is None or p.wait_s >= 0
        return
    ids = [id(r) for r in p.requests]
    assert len(set(ids)) == len(ids) and set(ids) <= {id(r) for r in pending}
    assert p.requests[0] is pending[0]  # the head always goes first
    taken = [r.rows for r in p.requests]
    if p.split:  # only the last entry, only one its owner can split, and whole members of it
        last = p.requests[-1]
        assert last.splitter is not None and 0 < p.split < last.count and len(p.requests) > 1
        taken[-1] = p.split * (last.rows // last.count)
    assert p.rows == sum(taken) <= rules.max_batch_size  # whole requests, never over max
    if not pol.enabled:
        assert len(p.requests) == 1
    assert p.instance in free or p.instance in queueable
    if p.instance not in free:  # behind a running batch: only complete batches (rule 5)
        assert not pol.enabled or p.rows >= rules.max_batch_size or p.rows in pol.preferred_batch_sizes
    for r in p.requests:  # every request fits the batch shape: equal, or padded up when paddable
        own, batch = r.shapes["x"], p.shapes["x"]
        assert own == batch or ("x" in rules.paddable and all(a <= b for a, b in zip(own, batch)))
    if rules.profiles:  # never a batch that no profile accepts, and on an instance of that profile
        assert p.profile is not None and p.profile.fits(rules.full(p.rows, p.shapes))
        assert p.instance in p.profile.instances


@st.composite
def stack_cases(draw):
    paddable = draw(st.booleans())
    n = draw(st.integers(1, 5))
    width = draw(st.integers(1, 5))
    reqs = []
    for i in range(n):
        rows = draw(st.integers(1, 3))
        w = draw(st.integers(1, 5)) if paddable else width
        data = np.arange(rows * w, dtype=np.float32).reshape(rows, w) + 100 * i
        reqs.append(Pending(inputs={"x": data}, outputs=("y",), rows=rows, shapes={"x": (w,)}, level=1, arrival=0.0,
                            ticket=None, seq=i))  # type: ignore[arg-type]
    return reqs, paddable


@FAST
@given(stack_cases())
def test_stack_then_split_returns_each_requests_own_data(case):
    reqs, paddable = case
    shapes = {"x": (max(r.shapes["x"][0] for r in reqs),)}
    batch = assemble.stack(reqs, shapes, {"x": -1.0} if paddable else {}, batches=True)
    assert batch["x"].shape == (sum(r.rows for r in reqs),) + shapes["x"]
    outputs = {"y": batch["x"] * 2}  # an elementwise model
    unpad = {"y": ("x", (0,))} if paddable else {}
    parts = assemble.split(outputs, reqs, unpad, batches=True)
    assert len(parts) == len(reqs)
    for r, part in zip(reqs, parts):
        np.testing.assert_array_equal(part["y"], r.inputs["x"] * 2)


@FAST
@given(st.integers(1, 8), st.integers(1, 8), st.tuples(st.integers(1, 6)), st.tuples(st.integers(1, 6)),
       st.booleans())
def test_merge_is_symmetric_and_bounded(rows_a, rows_b, a, b, paddable):
    rules = ShapeRules(batches=True, max_batch_size=8, paddable=frozenset({"x"} if paddable else ()), profiles=())
    m1 = rules.merge(rows_a, {"x": a}, rows_b, {"x": b})
    m2 = rules.merge(rows_b, {"x": b}, rows_a, {"x": a})
    assert m1 == m2
    if m1 is not None:
        total, shapes = m1
        assert total == rows_a + rows_b <= 8
        assert shapes["x"] == tuple(max(x, y) for x, y in zip(a, b))
        assert a == b or paddable
