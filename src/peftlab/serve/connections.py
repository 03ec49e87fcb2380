"""The server's connections, guarded below the web framework (uvicorn's h11 protocol, subclassed):
slow and idle clients cannot hold the server.

- a cap on open connections: one over it is answered 503 (JSON, Retry-After) and closed at once;
- a header deadline: a request whose headers are not complete within header_timeout_s of the
  connection (or of its first byte, on a kept-alive one) is answered 408 and closed;
- a body deadline: a body not complete within body_timeout_s of its headers is answered 408 and closed
  (a total, not an idle, deadline: one byte every few seconds does not keep it open);
- a malformed request (a bad Content-Length, a header line too long, ...) is answered 400 in JSON
  saying what h11 found wrong, where uvicorn answers plain text.
Idle kept-alive connections are closed by uvicorn after timeout_keep_alive (5 s).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass
class ConnectionLimits:
    max_connections: int = 256     # open at once; beyond: 503 at connect (keep it below the open-files limit)
    header_timeout_s: float = 10.0  # from the connection (or its first byte) to the end of the headers
    body_timeout_s: float = 30.0    # from the end of the headers to the end of the body


LINGER_S = 1.0  # how long a refused connection drains before it is closed


def raw_response(status: int, detail: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 response with the app's error shape, {"detail": ...}, closing the connection."""
    body = json.dumps({"detail": detail}).encode("utf-8")
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with `limits` (uvicorn.Config(http=...) takes the class)."""

    class Guarded(H11Protocol):
        _deadline = None
        _phase = None  # "headers" | "body" | None: what the running deadline waits for
        _h11_error = None
        _refused = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            original = self.conn.next_event

            def next_event():  # keep what h11 found wrong, to say it (uvicorn says only "invalid")
                try:
                    return original()
                except h11.RemoteProtocolError as e:
                    self._h11_error = str(e)
                    raise
            self.conn.next_event = next_event
            if len(self.connections) > limits.max_connections:
                self._refuse(503, f"too many open connections (this server takes {limits.max_connections}): "
                                  f"retry shortly", {"retry-after": "1"})
                return
            self._arm("headers")

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # answered already: what else arrives is dropped while the answer drains
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            what = (self._h11_error or msg).strip().rstrip(".")[:200]
            self._refuse(400, f"malformed HTTP request ({what}): check the request line, the headers and "
                              f"Content-Length")

        # -- deadlines --------------------------------------------------------------------------
        def _follow(self) -> None:
            """Arm, move or drop the deadline by where the client is in its request."""
            state = self.conn.their_state
            if self.transport.is_closing():
                self._disarm()
            elif state is h11.IDLE:
                # waiting for headers: a fresh byte on a kept-alive connection starts the clock
                if self._phase != "headers" and self.conn.trailing_data[0]:
                    self._arm("headers")
            elif state is h11.SEND_BODY:
                if self._phase != "body":
                    self._arm("body")
            else:  # the request is in (or the connection is done): the app has it
                self._disarm()

        def _arm(self, phase: str) -> None:
            self._disarm()
            seconds = limits.header_timeout_s if phase == "headers" else limits.body_timeout_s
            self._phase = phase
            self._deadline = self.loop.call_later(seconds, self._expired, phase, seconds)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self._phase = None

        def _expired(self, phase: str, seconds: float) -> None:
            self._deadline = self._phase = None
            if self.transport.is_closing():
                return
            cycle = self.cycle  # on a kept-alive connection, the previous request's (answered) until new headers
            if cycle is not None and cycle.response_started and not cycle.response_complete:
                self.transport.close()  # the app answers already: nothing else may be written
                return
            what = "request headers" if phase == "headers" else "request body"
            self._refuse(408, f"{what} not received within {seconds:g} s: send the whole request at once")

        def _refuse(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
            self._disarm()
            if self.cycle is not None:
                self.cycle.disconnected = True  # the app, if it waits for this body, sees a disconnect
                self.cycle.message_event.set()
            self._refused = True
            self.connections.discard(self)  # draining, not served: it no longer counts against the cap
            self.transport.write(raw_response(status, detail, headers))
            # closing at once with unread input would reset the connection, and the client might never
            # see the answer: end our side, drop what still comes, close shortly after
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

    return Guarded
