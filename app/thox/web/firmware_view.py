"""The firmware card's data: the install job the page runs (one at a time)
and RAUC's view of the slots (``updates.rauc.system_status``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ..errors import ThoxError
from ..updates import rauc
from .sessions import web_state


@dataclass
class FirmwareJob:
    """The one install the page runs at a time."""
    state: str = "idle"           # idle | uploading | installing | installed | failed
    percent: int = 0
    step: str = ""
    version: str | None = None
    error: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def busy(self) -> bool:
        return self.state in ("uploading", "installing")


def job() -> FirmwareJob:
    st = web_state()
    if st.firmware is None:
        st.firmware = FirmwareJob()
    return st.firmware


async def firmware_view() -> dict[str, Any]:
    """What the page's firmware card shows."""
    out: dict[str, Any] = {"job": job(), "status": None, "error": None}
    try:
        out["status"] = await asyncio.to_thread(rauc.system_status)
    except ThoxError as e:
        out["error"] = e.message
    return out
