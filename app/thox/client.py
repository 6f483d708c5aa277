"""Talking to a Thox device's API from the CLI. The device is found from
THOX_API_URL/THOX_API_KEY, then OPENAI_BASE_URL/OPENAI_API_BASE/OPENAI_API_KEY,
then the local service."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from .config import Config
from .errors import ThoxError


def _env(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


@dataclass
class DeviceClient:
    base_url: str          # ends with /v1
    api_key: str | None

    @classmethod
    def from_env(cls) -> "DeviceClient":
        url = _env("THOX_API_URL")
        key = _env("THOX_API_KEY")
        if url is None:
            url = _env("OPENAI_BASE_URL", "OPENAI_API_BASE")
            key = key or _env("OPENAI_API_KEY")
        if url is None:
            cfg = Config()
            url = f"http://127.0.0.1:{cfg.get('api.port')}/v1"
            if key is None:
                try:
                    key = cfg.api_key()
                except ThoxError:
                    key = None
        return cls(url.rstrip("/"), key)

    @property
    def root(self) -> str:
        return self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url

    def _get(self, url: str, auth: bool) -> dict:
        req = urllib.request.Request(url)
        if auth and self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read())["error"]["message"]
            except Exception:
                msg = e.reason
            raise ThoxError(f"{url}: HTTP {e.code}: {msg}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ThoxError(f"cannot reach the Thox service at {self.root}: {reason}") from None
        except ValueError:
            raise ThoxError(f"{url}: the answer is not JSON (is this a Thox device?)") from None

    def health(self) -> dict:
        return self._get(self.root + "/health", auth=False)

    def models(self) -> dict:
        return self._get(self.base_url + "/models", auth=True)
