"""Shared fixtures: a real redis-server on 127.0.0.1, a tiny model directory built locally."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def redis_url(tmp_path):
    from gantry.redis_server import RedisServer

    with RedisServer(tmp_path / "redis") as server:
        yield server.url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from gantry.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory):
    from gantry.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-tied"), tie_word_embeddings=True)
