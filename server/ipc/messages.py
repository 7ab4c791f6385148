"""What travels between a front end and the engine: plain tuples with an integer tag first.

Tuples of ints, strings and small tuples pickle and unpickle in a few microseconds, and a whole batch of
them goes as one pickle per wake-up (see channel.py), so the per-request cost stays small without a
schema compiler. Tensor bytes never travel here: they are offsets into the front end's arena
(arena.py), or client shared-memory regions the engine reads itself.

Front end -> engine
  (INFER, req_id, model, version, serial, inputs, outputs, rows, priority, timeout_us, deadline, t0_ns, trace)
      inputs:  ((name, datatype, shape, source), ...) where source is (ARENA, offset, nbytes)
               or (SHM, region, offset, byte_size)
      outputs: ((name, shm, slot), ...) in answer order; shm is (region, offset, byte_size) or None,
               slot is (offset, capacity) in the arena for the result, or None
      serial:  the model version's serial the request was checked against (a reload changes it)
      deadline: CLOCK_MONOTONIC seconds (the same clock in every process) or None
      t0_ns:   CLOCK_MONOTONIC ns when the front end received the request (REQUEST_START of a trace)
      trace:   None, or the request's id when the front end sampled it for tracing (server/tracing.py)
  (TRACE, req_id, end_ns)          a traced request's response is built (REQUEST_END); sent only for an INFER
                                   that got its RESULT
  (CANCEL, req_id)                 the client gave up; the engine still answers it exactly once
  (FAILED, model, version, reason, rows, request_ns)   a request the front end refused (statistics)
  (CALL, call_id, method, args)    a control call (metadata, load, shared-memory registration, ...)

Engine -> front end
  (RESULT, req_id, code, message, outputs)   code "" on success, else a grpc.StatusCode name;
      outputs: ((name, datatype, shape, where), ...) with where (ARENA, offset, nbytes) when written
               into the request's slot, (DATA, bytes) when it did not fit, (SHM,) when written into
               the client's region
  (RESULTS, req_ids, outputs)   successful answers of a group of alike requests (engine/group.py), each as if it
      had its own RESULT: outputs ((name, datatype, shape, offsets, nbytes), ...), the i-th request's output
      written at offsets[i] of its arena, nbytes long, of the shape given (one request's); offsets None when each
      request's output was written into its own shared-memory region (as (SHM,) in a RESULT)
  (REPLY, call_id, code, message, value)
  (SETTINGS, log_settings, trace_view)   on attach and on every change: the front end applies the log settings
      (server/logsettings.py) and samples traces with the view (server/tracing.py Sampler)
"""
from __future__ import annotations

INFER = 1
CANCEL = 2
FAILED = 3
CALL = 4
TRACE = 5
RESULT = 11
REPLY = 12
SETTINGS = 13
RESULTS = 14

ARENA = 0
SHM = 1
DATA = 2

# an INFER checked against a model version that has since been replaced: the front end checks it again
STALE = "STALE"
