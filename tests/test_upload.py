"""Uploads of exports (policy/upload.py): S3 against moto's S3 server and the Hub against a fake Hub
(tests/fake_hf_hub.py), both on 127.0.0.1; retries, the background worker, staging against
pruning, and the config / environment checks.

Not covered: the Hub's LFS / Xet transfer of large files (the fake Hub takes every file inline).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from gantry.config import ConfigError
from policy.upload import (
    STAGING_DIR,
    HubDestination,
    RetryPolicy,
    S3Destination,
    Uploader,
    upload_config_problems,
    upload_to_hf,
    upload_to_s3,
)
from tests.fake_hf_hub import FakeHub

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
TOKEN = "hf_gantry_test_token"
FAST = RetryPolicy(attempts=4, first_delay_s=0.01, factor=2.0)


def make_export(run_dir: Path, name: str, big: int = 12 * MiB) -> Path:
    """A directory in the layout export_hf writes; random bytes stand in for the weights."""
    out = run_dir / "export" / name
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    (out / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {}}}))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (out / "model-00001-of-00002.safetensors").write_bytes(os.urandom(big))
    (out / "model-00002-of-00002.safetensors").write_bytes(os.urandom(3 * MiB + 17))
    index = {
        "metadata": {"total_size": big},
        "weight_map": {"w": "model-00001-of-00002.safetensors"},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def contents(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def fingerprint(root: Path) -> dict[str, tuple]:
    """Per file: content hash, size, mtime, inode: what "left untouched" means."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[path.relative_to(root).as_posix()] = (digest, st.st_size, st.st_mtime_ns, st.st_ino)
    return found


# ------------------------------------------------------------------------------ servers


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """moto's S3 server on 127.0.0.1, reached through AWS_ENDPOINT_URL only; yields a client."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # Nothing from the machine's own AWS setup may leak in (profiles, instance metadata).
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import boto3

    # No endpoint_url here either: if AWS_ENDPOINT_URL were ignored, nothing would reach moto.
    yield boto3.session.Session().client("s3")
    server.stop()


def new_bucket(client) -> str:
    bucket = f"gantry-{uuid.uuid4().hex[:12]}"  # moto's state is per process, not per server
    client.create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def hub(monkeypatch):
    """The fake Hub, reached through HF_ENDPOINT set after huggingface_hub was imported."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent

    with FakeHub(TOKEN) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        # conftest makes huggingface_hub offline for the suite (read once, at import).
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        # Its request headers name a detected AI agent, from a registry fetched once from
        # constants.ENDPOINT (huggingface.co, fixed at import): give it an empty one instead.
        monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
        yield fake


# ------------------------------------------------------------------------------ transports


def test_s3_upload_round_trip_through_aws_endpoint_url(s3, tmp_path):
    from boto3.s3.transfer import TransferConfig

    export = make_export(tmp_path, "step_20")
    before = fingerprint(export)
    bucket = new_bucket(s3)
    # 5 MiB is S3's smallest part: the 12 MiB shard goes up in 3 parts.
    multipart = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)

    keys = upload_to_s3(export, bucket, "/exp/run-1/step_20/", transfer_config=multipart)

    local = contents(export)
    assert keys == sorted(f"exp/run-1/step_20/{name}" for name in local)
    listed = s3.list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(o["Key"] for o in listed) == keys
    for key in keys:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert body == local[key.removeprefix("exp/run-1/step_20/")], key
    big = s3.head_object(Bucket=bucket, Key="exp/run-1/step_20/model-00001-of-00002.safetensors")
    assert big["ETag"].strip('"').endswith("-3"), "the 12 MiB shard did not go multipart"
    assert fingerprint(export) == before


@pytest.mark.parametrize("xet", [True, False], ids=["xet-pipeline", "legacy-commit"])
def test_hub_upload_layout_bytes_and_token(hub, tmp_path, monkeypatch, xet):
    """Both upload_folder paths of huggingface_hub: with hf_xet installed, and without it."""
    from huggingface_hub import constants
    from huggingface_hub.utils._runtime import is_xet_available

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    assert is_xet_available() == xet  # hf_xet comes with huggingface_hub on x86_64 and arm64
    step = make_export(tmp_path, "step_20", big=2 * MiB)
    final = make_export(tmp_path, "final", big=2 * MiB)
    before = fingerprint(tmp_path / "export")

    url = upload_to_hf(step, "me/model", "step_20", commit_message="step 20")
    upload_to_hf(final, "me/model", "", commit_message="final")

    assert url.startswith(f"{hub.url}/me/model/commit/")
    repo = hub.repos["me/model"]
    assert repo.private and repo.commits == ["step 20", "final"]
    expected = {f"step_20/{k}": v for k, v in contents(step).items()} | contents(final)
    assert repo.files.keys() == expected.keys()
    assert all(repo.files[k] == v for k, v in expected.items())
    assert len(hub.calls("create")) == len(hub.calls("commit")) == 2
    assert {r.authorization for r in hub.requests} == {f"Bearer {TOKEN}"}
    assert fingerprint(tmp_path / "export") == before


def test_uploader_in_a_fresh_process_reads_endpoints_and_tokens_from_the_environment(
    hub, s3, tmp_path
):
    """The policy's case, no monkeypatching inside: HF_ENDPOINT, HF_TOKEN, AWS_* set at start."""
    run_dir = tmp_path / "run"
    for name in ("step_20", "final"):
        make_export(run_dir, name, big=6 * MiB)
    bucket = new_bucket(s3)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # nothing read from or written to the user's
    code = """
import json, sys
from dataclasses import asdict
from pathlib import Path
from policy.upload import RetryPolicy, Uploader

uploader = Uploader.from_settings(
    hf_repo="me/model", s3_mode="final", s3_bucket=sys.argv[2], s3_prefix="exp/grpo",
    run_id="run-1", retry=RetryPolicy(attempts=2, first_delay_s=0.05))
export = Path(sys.argv[1]) / "export"
uploader.submit(export / "step_20", name="step_20", final=False)
uploader.submit(export / "final", name="final", final=True)
print(json.dumps([asdict(r) for r in uploader.close(timeout_s=60)]))
"""
    done = subprocess.run(
        [sys.executable, "-c", code, str(run_dir), bucket],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(r["destination"], r["ok"], r["attempts"]) for r in results] == [
        ("hf://me/model/step_20", True, 1),
        ("hf://me/model", True, 1),
        (f"s3://{bucket}/exp/grpo/run-1/final/", True, 1),
    ], done.stderr

    step, final = contents(run_dir / "export/step_20"), contents(run_dir / "export/final")
    expected = {f"step_20/{k}": v for k, v in step.items()} | final
    files = hub.repos["me/model"].files
    assert files.keys() == expected.keys() and all(files[k] == v for k, v in expected.items())
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.calls("commit"))
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert listed == sorted(f"exp/grpo/run-1/final/{k}" for k in final)  # steps: "final" mode
    for name, data in final.items():
        assert (
            s3.get_object(Bucket=bucket, Key=f"exp/grpo/run-1/final/{name}")["Body"].read() == data
        )
    assert not (run_dir / "export" / STAGING_DIR).exists()


# ------------------------------------------------------------------------------ retries


@pytest.mark.parametrize(("route", "status"), [("create", 503), ("commit", 409)])
def test_a_hub_upload_that_fails_twice_succeeds_on_the_third_attempt(
    hub, tmp_path, caplog, route, status
):
    export = make_export(tmp_path, "step_20", big=MiB)
    hub.fail(route, times=2, status=status)
    # The third attempt is the last one allowed.
    uploader = Uploader(
        [HubDestination("me/model")], retry=RetryPolicy(attempts=3, first_delay_s=0.01)
    )

    with caplog.at_level(logging.WARNING, logger="gantry.policy.upload"):
        uploader.submit(export, name="step_20", final=False)
        (result,) = uploader.close(timeout_s=60)

    assert (result.destination, result.ok, result.attempts, result.error) == (
        "hf://me/model/step_20", True, 3, ""
    )  # fmt: skip
    assert len(hub.calls(route)) == 3
    assert hub.repos["me/model"].files.keys() == {f"step_20/{k}" for k in contents(export)}
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 2, retries
    assert all("hf://me/model/step_20" in m and str(status) in m for m in retries), retries


def test_destinations_that_always_fail_are_reported_and_never_raise(hub, s3, tmp_path, caplog):
    export = make_export(tmp_path, "final", big=MiB)
    before = fingerprint(export)
    hub.stop()  # the Hub is down: every connection is refused
    uploads = [HubDestination("me/model"), S3Destination("gantry-no-such-bucket", "exp/run-1")]
    # 0.3 s + 0.6 s of back-off per destination: no result can exist when submit() returns.
    uploader = Uploader(uploads, retry=RetryPolicy(attempts=3, first_delay_s=0.3, factor=2.0))

    with caplog.at_level(logging.WARNING, logger="gantry.policy.upload"):
        uploader.submit(export, name="final", final=True)
        assert uploader.results() == [] and uploader.pending() == 2
        assert uploader.busy_paths() == {export}
        results = uploader.close(timeout_s=60)

    assert [(r.destination, r.ok, r.attempts) for r in results] == [
        ("hf://me/model", False, 3),
        ("s3://gantry-no-such-bucket/exp/run-1/final/", False, 3),
    ]
    assert "ConnectError" in results[0].error
    assert "NoSuchBucket" in results[1].error
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m.split(" failed ")[0] for m in retries] == [
        "upload of final to hf://me/model",
        "upload of final to hf://me/model",
        "upload of final to s3://gantry-no-such-bucket/exp/run-1/final/",
        "upload of final to s3://gantry-no-such-bucket/exp/run-1/final/",
    ]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert "hf://me/model" in errors[0] and "ConnectError" in errors[0]
    assert "s3://gantry-no-such-bucket/" in errors[1] and "NoSuchBucket" in errors[1]
    assert fingerprint(export) == before
    assert sorted(p.name for p in export.parent.iterdir()) == ["final"]  # staging cleaned up
    assert uploader.pending() == 0 and uploader.busy_paths() == set()


# ------------------------------------------------------------------------------ the worker


class GatedDestination:
    """Uploads only when the test opens the gate; records what it read."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.read: dict[str, dict[str, bytes]] = {}

    def wants(self, final: bool) -> bool:
        return True

    def describe(self, name: str, final: bool) -> str:
        return f"gated://{name}"

    def upload(self, local_dir: Path, name: str, final: bool) -> None:
        assert self.gate.wait(30), "the test never opened the gate"
        self.read[name] = contents(local_dir)


def test_an_export_pruned_after_submit_is_still_uploaded_whole(tmp_path):
    export = make_export(tmp_path, "step_20", big=MiB)
    expected = contents(export)
    destination = GatedDestination()
    uploader = Uploader([destination], retry=FAST)

    uploader.submit(export, name="step_20", final=False)
    assert uploader.busy_paths() == {export}
    shutil.rmtree(export)  # what prune_step_dirs does to an old export
    destination.gate.set()
    (result,) = uploader.close(timeout_s=30)

    assert result.ok and destination.read["step_20"] == expected
    assert list((tmp_path / "export").iterdir()) == []  # the staging copy is gone too


def test_close_stops_waiting_after_its_timeout(tmp_path, caplog):
    first = make_export(tmp_path, "step_20", big=1024)
    second = make_export(tmp_path, "step_40", big=1024)
    destination = GatedDestination()
    uploader = Uploader([destination], retry=FAST)
    uploader.submit(first, name="step_20", final=False)
    uploader.submit(second, name="step_40", final=False)

    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="gantry.policy.upload"):
        results = uploader.close(timeout_s=0.3)
    assert time.monotonic() - started < 5

    assert [(r.name, r.ok, r.attempts) for r in results] == [
        ("step_20", False, 1),  # in flight
        ("step_40", False, 0),  # never started
    ]
    assert all("not finished" in r.error for r in results)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2
    destination.gate.set()
    assert uploader.close(timeout_s=30) == results  # the late finish is not reported again
    assert list(destination.read) == ["step_20"]  # and the queued upload was dropped
    with pytest.raises(RuntimeError, match="after close"):
        uploader.submit(first, name="step_20", final=False)


def test_a_failing_result_callback_does_not_stop_the_uploads(tmp_path, caplog):
    destination = GatedDestination()
    destination.gate.set()
    seen = []

    def callback(result):
        seen.append(result.name)
        raise ValueError("broken callback")

    uploader = Uploader([destination], retry=FAST, on_result=callback)
    for name in ("step_20", "step_40"):
        uploader.submit(make_export(tmp_path, name, big=1024), name=name, final=False)
    results = uploader.close(timeout_s=30)

    assert [r.ok for r in results] == [True, True] and seen == ["step_20", "step_40"]
    assert "broken callback" in caplog.text


class BrokenDestination(GatedDestination):
    """A destination with a bug: not a transport error, so never retried."""

    def upload(self, local_dir: Path, name: str, final: bool) -> None:
        raise TypeError("a bug in the destination")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_bug_is_not_retried_and_what_it_left_is_reported_at_close(tmp_path, caplog):
    uploader = Uploader([BrokenDestination()], retry=FAST)
    for name in ("step_20", "step_40"):
        uploader.submit(make_export(tmp_path, name, big=1024), name=name, final=False)
    with caplog.at_level(logging.WARNING, logger="gantry.policy.upload"):
        results = uploader.close(timeout_s=30)

    assert [(r.name, r.ok, r.attempts) for r in results] == [
        ("step_20", False, 1),  # one attempt: a TypeError is no network error
        ("step_40", False, 0),
    ]
    assert all("the upload thread stopped on an error" in r.error for r in results)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING], "no retry logged"


# ------------------------------------------------------------------------------ settings


def test_from_settings_routes_exports_by_mode(tmp_path):
    assert Uploader.from_settings(hf_repo="", s3_mode=False, run_id="r") is None
    uploader = Uploader.from_settings(
        s3_mode="final", s3_bucket="bucket", s3_prefix="/exp/", run_id="run-1",
        check_environment=False,
    )  # fmt: skip
    (destination,) = uploader.destinations
    assert destination.describe("final", True) == "s3://bucket/exp/run-1/final/"
    export = make_export(tmp_path, "step_20", big=1024)
    uploader.submit(export, name="step_20", final=False)  # "final" mode: not uploaded
    assert uploader.pending() == 0 and not (export.parent / STAGING_DIR).exists()
    assert uploader.close(timeout_s=5) == []

    both = Uploader.from_settings(
        hf_repo="me/model", s3_mode="all", s3_bucket="bucket", run_id="run-1",
        check_environment=False,
    )  # fmt: skip
    assert [d.describe("step_20", False) for d in both.destinations] == [
        "hf://me/model/step_20",
        "s3://bucket/run-1/step_20/",
    ]
    both.close(timeout_s=5)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"upload_hf": True, "hf_repo_name": ""}, "train.ckpt.hf_repo_name: is empty"),
        ({"upload_hf": True, "hf_repo_name": "me/my model"}, "is not a Hub repo id"),
        ({"upload_hf": True, "hf_repo_name": "a/b/c"}, "is not a Hub repo id"),
        ({"upload_s3": "some"}, "train.ckpt.upload_s3: expected false"),
        ({"upload_s3": "all", "s3_bucket": ""}, "train.ckpt.s3_bucket: is empty"),
        ({"upload_s3": "final", "s3_bucket": "s3://b/x"}, "give the name only"),
        ({"upload_s3": "final", "s3_bucket": "b", "s3_prefix": "s3://b/x"}, "looks like a URL"),
    ],
)
def test_upload_config_problems_name_the_key_and_the_fix(settings, problem):
    values = {"upload_hf": False, "hf_repo_name": "", "upload_s3": False, "s3_bucket": "b"}
    problems = upload_config_problems(**(values | settings))
    assert len(problems) == 1 and problem in problems[0], problems


def test_upload_config_problems_accepts_good_settings():
    assert upload_config_problems(
        upload_hf=True, hf_repo_name="me/my-model.v2", upload_s3="all", s3_bucket="my-bucket",
        s3_prefix="exp/grpo",
    ) == []  # fmt: skip
    assert upload_config_problems(
        upload_hf=False, hf_repo_name="", upload_s3=False, s3_bucket=""
    ) == []  # fmt: skip


def test_missing_credentials_fail_at_start_up(monkeypatch, tmp_path):
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    with pytest.raises(ConfigError) as caught:
        Uploader.from_settings(hf_repo="me/model", s3_mode="all", s3_bucket="bucket")
    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert "HF_HUB_OFFLINE" in problems[0]
    assert "HF_TOKEN" in problems[1]
    assert "AWS_ACCESS_KEY_ID" in problems[2]
