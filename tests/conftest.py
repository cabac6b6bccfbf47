"""Shared fixtures: a real redis-server on 127.0.0.1, tiny model directories built locally."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def redis_url(tmp_path):
    from gantry.launch.redis_server import RedisServer

    with RedisServer(tmp_path / "redis") as server:
        yield server.url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from gantry.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory):
    from gantry.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2-tied"), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    """The built-in tiny Qwen2 (gantry:tiny-qwen2), as `ensure_tiny_model` makes it."""
    from gantry.models.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("llm") / "model")


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """The built-in tiny Qwen2.5-VL (gantry:tiny-qwen2.5-vl)."""
    from gantry.models.tiny import ensure_tiny_vlm

    return ensure_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model")
