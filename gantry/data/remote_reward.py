"""A reward computed by the user's own scorer over HTTP (train.train_policy.reward_server).

Per group, one POST of JSON {"completions": [str, ...], "sample": {...}, "prompt_id": str} to
the URL; the answer is JSON {"rewards": [float, ...]} with one value per completion, and
optionally "infos": [{...}, ...] (logged with the samples). Connection errors, timeouts and
502/503/504 answers are retried `retries` times with exponential backoff (urllib3's Retry);
after that, or on any other failure, the run stops with one line naming the URL.

    scorer = RemoteReward("http://127.0.0.1:8000/score", timeout=30, retries=3)
    rewards, infos = scorer(["a", "b"], sample, "0:17")
"""

from __future__ import annotations

import json
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from gantry.run.errors import RecursOnRetry


class RemoteRewardError(RecursOnRetry, RuntimeError):
    """The reward server cannot be used: down after the retries, or a wrong answer."""


class RemoteReward:
    """A batched reward function backed by an HTTP endpoint."""

    batched = True  # called once per group with all its completions

    def __init__(self, url: str, timeout: float, retries: int) -> None:
        self.url, self.timeout, self.retries = url, timeout, retries
        self.__name__ = "remote"
        self._session: requests.Session | None = None

    def _client(self) -> requests.Session:
        if self._session is None:  # made on first use: the object is built before forking
            retry = Retry(
                total=self.retries,
                connect=self.retries,
                read=self.retries,
                status=self.retries,
                backoff_factor=0.5,
                status_forcelist=(502, 503, 504),
                allowed_methods=None,  # POST too: scoring has no side effects to repeat
                raise_on_status=False,
            )
            self._session = requests.Session()
            adapter = HTTPAdapter(max_retries=retry)
            self._session.mount("http://", adapter)
            self._session.mount("https://", adapter)
        return self._session

    def __call__(
        self, completions: list[str], sample: Any, prompt_id: str = ""
    ) -> tuple[list[float], list[dict]]:
        body = {"completions": completions, "sample": _jsonable(sample), "prompt_id": prompt_id}
        where = f"reward server {self.url}"
        try:
            answer = self._client().post(self.url, json=body, timeout=self.timeout)
        except requests.RequestException as exc:
            raise RemoteRewardError(
                f"{where} is unreachable after {self.retries} retries "
                f"({type(exc).__name__}): start it, or fix train.train_policy.reward_server.url"
            ) from None
        if answer.status_code != 200:
            raise RemoteRewardError(
                f"{where} answered HTTP {answer.status_code} after {self.retries} retries: "
                f"{answer.text[:200]!r}"
            )
        try:
            data = answer.json()
        except ValueError:
            raise RemoteRewardError(f"{where} answered {answer.text[:200]!r}, not JSON") from None
        rewards = data.get("rewards") if isinstance(data, dict) else None
        if not isinstance(rewards, list) or len(rewards) != len(completions):
            raise RemoteRewardError(
                f"{where} answered {json.dumps(data)[:200]}; expected "
                f'{{"rewards": [{len(completions)} floats]}}'
            )
        infos = data.get("infos") or [{} for _ in completions]
        return rewards, infos


def _jsonable(sample: Any) -> Any:
    """The sample as JSON: values JSON cannot hold (images, tensors) as their repr."""
    return json.loads(json.dumps(sample, default=lambda value: repr(value)[:1000]))
