"""One front end as the engine sees it: its link, its arena, the requests it has in flight, and the rule every answer
follows (it goes out only while the front end is there; once the front end has gone, its arena is unmapped when the
last request that could read it has finished)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from trtserve.server.ipc import messages as m
from trtserve.server.ipc.arena import Arena
from trtserve.server.ipc.channel import Link


class Session:
    """One front end's link, arena and requests in flight."""

    def __init__(self, name: str, link: Link, arena: Optional[Arena]) -> None:
        self.name = name
        self.link = link
        self.arena = arena
        self.inflight: Dict[int, Any] = {}  # req_id -> its single_path.InFlight, or the group.Group it is queued in
        self.closed = False
        # traced requests answered, waiting for the front end's TRACE: req_id -> (model, version, id, stamps)
        self.traces: Dict[int, Tuple[str, str, str, List[Tuple[str, int]]]] = {}

    def answered(self, req_ids: Tuple[int, ...]) -> bool:
        """The requests are no longer in flight; whether their answers can go out (False once the front end went
        away)."""
        inflight = self.inflight
        for req_id in req_ids:
            inflight.pop(req_id, None)
        if self.closed:
            if not inflight and self.arena is not None:
                self.arena.close()
            return False
        return True

    def answer(self, req_id: int, code: str, message: str, outputs: tuple) -> None:
        """One request's RESULT (``code`` "" for success, with ``outputs`` as written)."""
        if self.answered((req_id,)):
            self.send_answers((m.RESULT, req_id, code, message, outputs))

    def send_answers(self, message: tuple) -> None:
        """A RESULT or RESULTS of requests ``answered`` took: once the front end has nothing else in flight, no
        answer will join it this turn, and it goes at once."""
        self.link.send(message)
        if not self.inflight:
            self.link.flush()
