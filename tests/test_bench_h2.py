"""The load generator's own HTTP/2 client, without a network: HPACK against RFC 7541's examples, and
the connection state against frames a server could send (split anywhere, padded, continued, reset)."""
from __future__ import annotations

import struct
from typing import List, Tuple

import pytest

from trtserve.client.bench import h2conn
from trtserve.client.bench.h2conn import (CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PADDED, PING,
                                          PREFACE, PRIORITY_FLAG, PUSH_PROMISE, RST_STREAM, SETTINGS, WINDOW_UPDATE,
                                          H2Connection, ProtocolError, grpc_timeout)
from trtserve.client.bench.hpack import Decoder, HpackError, encode_block, encode_int, huffman_decode

# RFC 7541 C.4 (requests, Huffman) and C.6 (responses, Huffman, a 256-byte table that evicts)
C4 = ["828684418cf1e3c2e5f23a6ba0ab90f4ff", "828684be5886a8eb10649cbf",
      "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"]
C6 = ["488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3",
      "4883640effc1c0bf",
      "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335dfdfcd5b3960d5af27087f"
      "3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007"]


def test_hpack_decodes_rfc7541_request_examples_with_huffman_and_the_dynamic_table():
    d = Decoder()
    first = d.decode(bytes.fromhex(C4[0]))
    assert first == [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")]
    assert d._size == 57
    assert d.decode(bytes.fromhex(C4[1]))[-1] == ("cache-control", "no-cache") and d._size == 110
    third = d.decode(bytes.fromhex(C4[2]))
    assert third == [(":method", "GET"), (":scheme", "https"), (":path", "/index.html"),
                     (":authority", "www.example.com"), ("custom-key", "custom-value")]
    assert d._size == 164


def test_hpack_decodes_rfc7541_response_examples_with_eviction():
    d = Decoder(256)
    assert d.decode(bytes.fromhex(C6[0])) == [(":status", "302"), ("cache-control", "private"),
                                              ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                                              ("location", "https://www.example.com")]
    second = d.decode(bytes.fromhex(C6[1]))
    assert second[0] == (":status", "307") and second[3] == ("location", "https://www.example.com")
    assert d._size == 222  # ":status: 302" was evicted to make room
    third = d.decode(bytes.fromhex(C6[2]))
    assert third[0] == (":status", "200") and third[4] == ("content-encoding", "gzip")
    assert third[5] == ("set-cookie", "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")
    assert d._size == 215


def test_hpack_cache_never_serves_a_block_whose_meaning_the_table_changed():
    """The same bytes (an indexed field, 0xbe = dynamic entry 1) mean different headers once an
    insertion shifted the table: the decoder's cache of repeated blocks must not hide that."""
    d = Decoder()
    d.decode(b"\x40" + encode_int(1, 7) + b"a" + encode_int(1, 7) + b"1")  # insert a: 1
    assert d.decode(b"\xbe") == [("a", "1")]
    d.decode(b"\x40" + encode_int(1, 7) + b"b" + encode_int(1, 7) + b"2")  # insert b: 2, now entry 1
    assert d.decode(b"\xbe") == [("b", "2")]
    d.decode(b"\x20")  # size update to 0 empties the table
    with pytest.raises(HpackError, match="outside the tables"):
        d.decode(b"\xbe")


@pytest.mark.parametrize("block, match", [
    (b"\x80", "index 0"), (b"\xff\xff\xff\xff\xff\xff", "integer"), (b"\x00\x05ab", "truncated"),
    (b"\x3f\xc9\x27", "table size update"),  # to 5096, above the 4096 allowed
])
def test_hpack_rejects_broken_blocks(block, match):
    with pytest.raises(HpackError, match=match):
        Decoder().decode(block)


def test_huffman_rejects_bad_padding_and_eos():
    assert huffman_decode(bytes.fromhex("a8eb10649cbf")) == b"no-cache"
    with pytest.raises(HpackError, match="padding"):
        huffman_decode(bytes.fromhex("a8eb10649cbf") + b"\xff")  # 8 bits of padding
    with pytest.raises(HpackError, match="padding"):
        huffman_decode(b"\x00")  # '0' then padding of zeros
    with pytest.raises(HpackError, match="EOS"):
        huffman_decode(b"\xff\xff\xff\xff")  # the 30-bit EOS code, then ones


def test_grpc_timeout_uses_at_most_eight_digits():
    assert grpc_timeout(0.05) == "50000000n"
    assert grpc_timeout(30.0) == "30000000u"
    assert grpc_timeout(3600.0) == "3600000m"
    assert all(len(grpc_timeout(s)) <= 9 for s in (1e-9, 1.0, 1e5, 1e8, 1e12))


# ---------------------------------------------------------------- a scripted server
def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", sid) + payload


def parse(data: bytes) -> List[Tuple[int, int, int, bytes]]:
    """The frames a client sent (after the preface): (type, flags, stream, payload)."""
    if data.startswith(PREFACE):
        data = data[len(PREFACE):]
    out, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 3], "big")
        out.append((data[pos + 3], data[pos + 4], int.from_bytes(data[pos + 5:pos + 9], "big"),
                    data[pos + 9:pos + 9 + n]))
        pos += 9 + n
    return out


def grpc_message(body: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(body)) + body


def ok_response(sid: int, body: bytes = b"answer") -> bytes:
    return (frame(HEADERS, END_HEADERS, sid, encode_block([(":status", "200"), ("content-type", "application/grpc")]))
            + frame(DATA, 0, sid, grpc_message(body))
            + frame(HEADERS, END_HEADERS | END_STREAM, sid, encode_block([("grpc-status", "0")])))


def connect(settings: bytes = b"") -> H2Connection:
    c = H2Connection("127.0.0.1:8001", "/inference.GRPCInferenceService/ModelInfer")
    sent = c.data_to_send()
    assert sent.startswith(PREFACE)
    kinds = [f[0] for f in parse(sent)]
    assert kinds == [SETTINGS, WINDOW_UPDATE]  # our settings, and the connection window opened wide
    assert c.receive(frame(SETTINGS, 0, 0, settings)) == []
    assert parse(c.data_to_send()) == [(SETTINGS, 1, 0, b"")]  # acknowledged
    return c


def test_a_call_sends_headers_and_one_message_and_reads_the_answer_split_anywhere():
    c = connect()
    call = c.start_call(b"request", timeout_s=2.0, metadata=[("Authorization", "Bearer x")])
    frames = parse(c.data_to_send())
    assert [(k, f, s) for k, f, s, _ in frames] == [(HEADERS, END_HEADERS, 1), (DATA, END_STREAM, 1)]
    headers = dict(Decoder().decode(frames[0][3]))
    assert headers[":method"] == "POST" and headers[":path"] == "/inference.GRPCInferenceService/ModelInfer"
    assert headers["content-type"] == "application/grpc" and headers["te"] == "trailers"
    assert headers["grpc-timeout"] == "2000000u" and headers["authorization"] == "Bearer x"
    assert frames[1][3] == grpc_message(b"request")
    wire = ok_response(1, b"x" * 1000)
    results = []
    for i in range(len(wire)):  # one byte at a time: frames cross every boundary
        results += c.receive(wire[i:i + 1])
    assert [(r.call_id, r.status, r.message) for r in results] == [(call, None, b"x" * 1000)]
    assert c.active == 0


def test_padding_priority_and_continuation_are_read():
    c = connect()
    call = c.start_call(b"q")
    c.data_to_send()
    block = encode_block([(":status", "200"), ("content-type", "application/grpc")])
    trailers = encode_block([("grpc-status", "0")])
    exchange = (
        # HEADERS: pad length 3, the priority fields (5 bytes), the block's first 4 bytes, 3 bytes of padding
        frame(HEADERS, PADDED | PRIORITY_FLAG, 1, bytes([3]) + b"\x00\x00\x00\x00\x10" + block[:4] + b"\x00" * 3)
        + frame(CONTINUATION, END_HEADERS, 1, block[4:])
        + frame(DATA, PADDED, 1, bytes([5]) + grpc_message(b"padded") + b"\x00" * 5)
        + frame(HEADERS, END_STREAM, 1, trailers[:1]) + frame(CONTINUATION, END_HEADERS, 1, trailers[1:]))
    results = c.receive(exchange)
    assert [(r.call_id, r.status, r.message) for r in results] == [(call, None, b"padded")]


def test_a_frame_between_headers_and_continuation_is_a_protocol_error():
    c = connect()
    c.start_call(b"q")
    c.data_to_send()
    with pytest.raises(ProtocolError, match="inside a header block"):
        c.receive(frame(HEADERS, 0, 1, b"\x88") + frame(PING, 0, 0, b"\x00" * 8))


@pytest.mark.parametrize("trailers, status, details", [
    ([(":status", "200"), ("grpc-status", "3"), ("grpc-message", "bad%20input: %E2%9C%93")],
     "INVALID_ARGUMENT", "bad input: \u2713"),  # trailers-only answer, percent-encoded UTF-8
    ([(":status", "503")], "UNAVAILABLE", "HTTP status 503"),  # a proxy's answer, no gRPC status
    ([(":status", "404")], "UNIMPLEMENTED", "HTTP status 404"),
    ([(":status", "200")], "INTERNAL", "without a grpc-status"),
    ([(":status", "200"), ("grpc-status", "99")], "UNKNOWN", ""),
])
def test_error_answers_map_to_grpc_status_names(trailers, status, details):
    c = connect()
    call = c.start_call(b"q")
    c.data_to_send()
    [r] = c.receive(frame(HEADERS, END_HEADERS | END_STREAM, 1, encode_block(trailers)))
    assert (r.call_id, r.status) == (call, status) and details in r.details


def test_a_compressed_or_truncated_message_is_internal():
    for body in (b"\x01" + struct.pack(">I", 2) + b"zz", b"\x00" + struct.pack(">I", 9) + b"short"):
        c = connect()
        c.start_call(b"q")
        c.data_to_send()
        wire = (frame(HEADERS, END_HEADERS, 1, encode_block([(":status", "200")])) + frame(DATA, 0, 1, body)
                + frame(HEADERS, END_HEADERS | END_STREAM, 1, encode_block([("grpc-status", "0")])))
        [r] = c.receive(wire)
        assert r.status == "INTERNAL" and "uncompressed gRPC message" in r.details


@pytest.mark.parametrize("code, status", [(7, "UNAVAILABLE"), (8, "CANCELLED"), (11, "RESOURCE_EXHAUSTED"),
                                          (2, "INTERNAL")])
def test_stream_resets_map_to_grpc_status(code, status):
    c = connect()
    call = c.start_call(b"q")
    c.data_to_send()
    [r] = c.receive(frame(RST_STREAM, 0, 1, struct.pack(">I", code)))
    assert (r.call_id, r.status) == (call, status) and f"HTTP/2 error {code}" in r.details


def test_ping_is_answered_with_its_payload():
    c = connect()
    c.receive(frame(PING, 0, 0, b"12345678"))
    assert parse(c.data_to_send()) == [(PING, 1, 0, b"12345678")]


def test_flow_control_holds_the_body_until_the_windows_open():
    c = connect()
    body = bytes(range(256)) * 400  # 102,400 bytes + 5 of gRPC framing: more than the 65,535 default window
    call = c.start_call(body)
    frames = parse(c.data_to_send())
    data = [f for f in frames if f[0] == DATA]
    assert sum(len(f[3]) for f in data) == 65535 and all(len(f[3]) <= 16384 for f in data)
    assert not any(f[1] & END_STREAM for f in data)
    c.receive(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20)))  # connection only: the stream's is spent
    assert parse(c.data_to_send()) == []
    c.receive(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 1 << 20) + struct.pack(">HI", 5, 1 << 16)))
    rest = [f for f in parse(c.data_to_send()) if f[0] == DATA]  # a larger initial window applies to open streams
    assert sum(len(f[3]) for f in rest) == len(body) + 5 - 65535 and rest[-1][1] & END_STREAM
    assert b"".join(f[3] for f in data + rest) == grpc_message(body)
    assert [r.call_id for r in c.receive(ok_response(1))] == [call]


def test_data_under_a_new_initial_window_goes_out_after_the_settings_ack():
    """gRPC's server checks a stream's data against the initial window we acknowledged: DATA sent under a larger
    window before the ACK reaches it overflows the window it knows, and it resets the stream (PROTOCOL_ERROR)."""
    c = connect()
    c.start_call(bytes(100_000))
    c.data_to_send()  # the first 65,535 bytes: the default window is spent
    c.receive(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 20)))
    c.receive(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 1 << 20)))
    kinds = [(f[0], f[1]) for f in parse(c.data_to_send())]
    assert kinds[0] == (SETTINGS, 1) and any(kind == DATA for kind, _ in kinds[1:]), kinds
    c2 = connect()  # a call started by the same SETTINGS (its stream limit raised) waits for the ACK as well
    c2.receive(frame(SETTINGS, 0, 0, struct.pack(">HI", 3, 0)))  # no streams: the call waits
    c2.data_to_send()
    c2.start_call(bytes(10))
    assert [f[0] for f in parse(c2.data_to_send())] == []
    c2.receive(frame(SETTINGS, 0, 0, struct.pack(">HI", 3, 10) + struct.pack(">HI", 4, 1 << 20)))
    assert [f[0] for f in parse(c2.data_to_send())] == [SETTINGS, HEADERS, DATA]


def test_calls_past_max_concurrent_streams_wait_in_order():
    c = connect(struct.pack(">HI", 3, 1))  # SETTINGS_MAX_CONCURRENT_STREAMS = 1
    first, second = c.start_call(b"a"), c.start_call(b"b")
    assert {f[2] for f in parse(c.data_to_send())} == {1}
    assert c.active == 2
    [r] = c.receive(ok_response(1))
    assert r.call_id == first
    frames = parse(c.data_to_send())  # the second call's stream opens now
    assert {f[2] for f in frames} == {3} and frames[-1][3] == grpc_message(b"b")
    assert [r.call_id for r in c.receive(ok_response(3))] == [second]


def test_goaway_fails_only_the_calls_the_server_never_took():
    c = connect()
    a, b = c.start_call(b"a"), c.start_call(b"b")
    c.data_to_send()
    [r] = c.receive(frame(GOAWAY, 0, 0, struct.pack(">II", 1, 0)))  # stream 1 is being served, 3 is not
    assert (r.call_id, r.status) == (b, "UNAVAILABLE") and "going away" in r.details
    with pytest.raises(ProtocolError, match="going away"):
        c.start_call(b"c")
    assert [(x.call_id, x.status) for x in c.receive(ok_response(1))] == [(a, None)]


def test_a_cancelled_call_is_reset_and_its_late_headers_still_feed_the_table():
    c = connect()
    gone = c.start_call(b"a")
    c.data_to_send()
    r = c.cancel(gone, "DEADLINE_EXCEEDED", "deadline exceeded")
    assert r is not None and r.status == "DEADLINE_EXCEEDED"
    assert parse(c.data_to_send()) == [(RST_STREAM, 0, 1, struct.pack(">I", 8))]
    live = c.start_call(b"b")
    c.data_to_send()
    # the late answer to stream 1 inserts "x-late: 1" into the table; stream 3's answer refers to it
    late = frame(HEADERS, END_HEADERS | END_STREAM, 1,
                 b"\x40" + encode_int(6, 7) + b"x-late" + encode_int(1, 7) + b"1" + encode_block([(":status", "200")]))
    answer = (frame(HEADERS, END_HEADERS, 3, b"\xbe" + encode_block([(":status", "200")]))
              + frame(DATA, 0, 3, grpc_message(b"ok"))
              + frame(HEADERS, END_HEADERS | END_STREAM, 3, encode_block([("grpc-status", "0")])))
    assert [(x.call_id, x.status, x.message) for x in c.receive(late + answer)] == [(live, None, b"ok")]
    assert c.cancel(live) is None  # finished calls cannot be cancelled


def test_a_call_waiting_for_a_stream_can_be_cancelled_before_it_is_sent():
    c = connect(struct.pack(">HI", 3, 1))
    c.start_call(b"a")
    waiting = c.start_call(b"b")
    c.data_to_send()
    r = c.cancel(waiting)
    assert r is not None and r.status == "CANCELLED" and parse(c.data_to_send()) == []
    assert c.active == 1


def test_push_promise_is_a_protocol_error_and_fail_all_answers_everything():
    c = connect(struct.pack(">HI", 3, 1))
    calls = [c.start_call(b"a"), c.start_call(b"b")]
    c.data_to_send()
    with pytest.raises(ProtocolError, match="PUSH_PROMISE"):
        c.receive(frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02"))
    failed = c.fail_all("INTERNAL", "protocol error")
    assert sorted(r.call_id for r in failed) == calls and {r.status for r in failed} == {"INTERNAL"}
    assert c.active == 0 and c.closed


def test_the_connection_window_is_reopened_as_data_arrives(monkeypatch):
    monkeypatch.setattr(h2conn, "_REPLENISH_AT", 1000)
    c = connect()
    c.start_call(b"a")
    c.data_to_send()
    c.receive(ok_response(1, b"y" * 2000))
    updates = [f for f in parse(c.data_to_send()) if f[0] == WINDOW_UPDATE]
    assert updates == [(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2005))]


def test_unknown_frame_types_and_priority_are_ignored():
    c = connect()
    call = c.start_call(b"a")
    c.data_to_send()
    noise = frame(0x2, 0, 1, b"\x00" * 5) + frame(0xEE, 0, 0, b"whatever")
    assert [(r.call_id, r.status) for r in c.receive(noise + ok_response(1))] == [(call, None)]


@pytest.mark.parametrize("bad, match", [
    (frame(GOAWAY, 0, 0, b"\x00\x00"), "malformed frame"),
    (frame(WINDOW_UPDATE, 0, 0, b"\x00"), "malformed frame"),
    (frame(SETTINGS, 0, 0, b"\x00\x05\x00\x00"), "multiple of 6"),
    (frame(SETTINGS, 0, 0, struct.pack(">HI", 5, 100)), "MAX_FRAME_SIZE"),
    (frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 2**31)), "initial window"),
])
def test_malformed_control_frames_are_protocol_errors(bad, match):
    c = connect()
    c.start_call(b"a")
    with pytest.raises(ProtocolError, match=match):
        c.receive(bad)


def test_goaway_also_fails_calls_still_waiting_for_a_stream_and_opens_none():
    c = connect(struct.pack(">HI", 3, 1))  # one stream at a time
    served, waiting = c.start_call(b"a"), c.start_call(b"b")
    c.data_to_send()
    [r] = c.receive(frame(GOAWAY, 0, 0, struct.pack(">II", 1, 0)))
    assert (r.call_id, r.status) == (waiting, "UNAVAILABLE")
    assert [(x.call_id, x.status) for x in c.receive(ok_response(1))] == [(served, None)]
    assert [f for f in parse(c.data_to_send()) if f[0] in (HEADERS, DATA)] == []  # no stream 3
    assert c.active == 0


def test_stream_ids_running_out_close_the_connection_for_new_calls():
    c = connect()
    c._next_sid = h2conn.MAX_STREAM_ID  # the last stream id a client may use
    last = c.start_call(b"a")
    assert {f[2] for f in parse(c.data_to_send())} == {h2conn.MAX_STREAM_ID}
    with pytest.raises(ProtocolError, match="stream ids exhausted"):
        c.start_call(b"b")
    assert [r.call_id for r in c.receive(ok_response(h2conn.MAX_STREAM_ID))] == [last]
