"""The Responses API's stored responses: each response object as it was
sent, with the conversation it ends (as chat messages), so a request with
``previous_response_id`` continues it. Bounded, in memory."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from ..errors import NotFound

STORE_MAX_ITEMS = 1000
STORE_MAX_BYTES = 64 << 20


class ResponseStore:
    """Stored responses and the conversation each ends, least recently used
    evicted first once there are more than ``max_items`` or their JSON passes
    ``max_bytes``."""

    def __init__(self, max_items: int = STORE_MAX_ITEMS, max_bytes: int = STORE_MAX_BYTES):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, tuple[dict, list[dict], int]] = OrderedDict()
        self.bytes = 0

    def put(self, response: dict[str, Any], history: list[dict[str, Any]]) -> None:
        size = len(json.dumps(response)) + len(json.dumps(history))
        self.delete(response["id"])
        self._items[response["id"]] = (response, history, size)
        self.bytes += size
        while self._items and (len(self._items) > self.max_items or self.bytes > self.max_bytes):
            _, (_, _, n) = self._items.popitem(last=False)
            self.bytes -= n

    def get(self, rid: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if rid not in self._items:
            raise NotFound(f"Response with id '{rid}' not found.", param="response_id")
        self._items.move_to_end(rid)
        response, history, _ = self._items[rid]
        return response, history

    def delete(self, rid: str) -> bool:
        item = self._items.pop(rid, None)
        if item is None:
            return False
        self.bytes -= item[2]
        return True
