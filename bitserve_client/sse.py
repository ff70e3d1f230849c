"""A Server-Sent Events parser (the WHATWG "event stream interpretation"), line by line.

Small enough to own: the client then needs nothing beyond httpx.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Message:
    event: str
    data: str
    id: str | None = None


class SseParser:
    """Feed lines (without their end-of-line); complete messages come back from `feed`."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> Message | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):  # a comment: the server's keep-alive ping
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        # "retry" and unknown fields: ignored (reconnection is the caller's business)
        return None

    def _dispatch(self) -> Message | None:
        if not self._data:  # a block without data is no event (spec), only its type resets
            self._event = ""
            return None
        message = Message(self._event or "message", "\n".join(self._data), self._id)
        self._event, self._data = "", []
        return message
