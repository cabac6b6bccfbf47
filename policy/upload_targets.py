"""Where exports are uploaded to, and how: the `[train.ckpt]` upload keys' checks, the two
transports (`upload_to_hf`, `upload_to_s3`), the `Destination`s the uploader hands exports to,
and the errors of those transports that are worth another attempt (`retryable_errors`).

The background queue, the retries and the staging of exports are in `policy.upload`, which
re-exports every name here. boto3 and huggingface_hub are imported when first needed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

S3Mode = Literal["final", "all"]

# A Hub repo id: "name" (the token's own namespace) or "namespace/name".
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


# ------------------------------------------------------------------------------ validation


def upload_config_problems(
    *, upload_hf: bool, hf_repo_name: str, upload_s3: Any, s3_bucket: str, s3_prefix: str = ""
) -> list[str]:
    """What is wrong with the `[train.ckpt]` upload keys, one line per problem ([] if fine).

    Needs nothing but `re`, so that it can move into the config schema as it is (gantry/ may
    not import policy/) and be imported from there.
    """
    problems = []
    if upload_hf and not hf_repo_name.strip():
        problems.append(
            "train.ckpt.hf_repo_name: is empty but train.ckpt.upload_hf = true; set it to a "
            'Hub repo id such as "me/my-model", or set upload_hf = false'
        )
    elif upload_hf and not _REPO_ID.match(hf_repo_name):
        problems.append(
            f"train.ckpt.hf_repo_name: {hf_repo_name!r} is not a Hub repo id; expected "
            '"namespace/name" with letters, digits, "-", "_" and "." only'
        )
    if upload_s3 not in (False, None, "final", "all"):
        problems.append(
            f'train.ckpt.upload_s3: expected false, "final" or "all", got {upload_s3!r}'
        )
    elif upload_s3 and not s3_bucket.strip():
        problems.append(
            f"train.ckpt.s3_bucket: is empty but train.ckpt.upload_s3 = {upload_s3!r}; set the "
            "bucket name, or set upload_s3 = false"
        )
    if upload_s3 and ("/" in s3_bucket or s3_bucket.strip() != s3_bucket):
        problems.append(
            f"train.ckpt.s3_bucket: {s3_bucket!r} is not a bucket name; give the name only "
            '(e.g. "my-bucket") and put the path in train.ckpt.s3_prefix'
        )
    if upload_s3 and "://" in s3_prefix:
        problems.append(
            f"train.ckpt.s3_prefix: {s3_prefix!r} looks like a URL; give the key prefix only "
            '(e.g. "experiments/grpo"), the bucket goes in train.ckpt.s3_bucket'
        )
    return problems


def environment_problems(*, hf: bool, s3: bool) -> list[str]:
    """Missing credentials or an offline switch that would make every upload fail hours later."""
    problems = []
    if hf:
        from huggingface_hub import constants, get_token

        if constants.is_offline_mode():
            problems.append(
                "train.ckpt.upload_hf = true but HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set "
                "for the policy, and huggingface_hub refuses to upload offline; unset it"
            )
        if get_token() is None:
            problems.append(
                "train.ckpt.upload_hf = true but no Hugging Face token was found; set HF_TOKEN "
                "in the policy's environment or run `hf auth login`"
            )
    if s3:
        import boto3

        if boto3.session.Session().get_credentials() is None:
            problems.append(
                "train.ckpt.upload_s3 is set but boto3 finds no AWS credentials; set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for the policy"
            )
    return problems


def retryable_errors() -> tuple[type[BaseException], ...]:
    """The errors of an upload that another attempt may not meet: the network, the remote
    service (an HTTP status, an S3 error code), the local disk. Anything else is a bug and
    propagates. The transports' own error bases, so that every status and error code counts."""
    import boto3.exceptions
    import botocore.exceptions
    from huggingface_hub import errors as hub_errors

    return (
        OSError,  # the disk, and sockets (requests' errors are OSErrors too)
        hub_errors.HfHubHTTPError,  # an HTTP status from the Hub (a 5xx, a 409 conflict, ...)
        hub_errors.HTTPError,  # the Hub client's base error: refused connections, timeouts
        botocore.exceptions.BotoCoreError,  # no endpoint, no credentials, a read timeout
        botocore.exceptions.ClientError,  # an S3 error code (SlowDown, NoSuchBucket, ...)
        boto3.exceptions.Boto3Error,  # S3UploadFailedError, wrapping the two above
    )


# ------------------------------------------------------------------------------ transports


def upload_to_s3(
    local_dir: Path,
    bucket: str,
    key_prefix: str,
    *,
    client: Any = None,
    transfer_config: Any = None,
) -> list[str]:
    """Upload every file under `local_dir` to `s3://bucket/<key_prefix>/<relative path>`.

    `client` defaults to a new boto3 S3 client, so credentials, region and `AWS_ENDPOINT_URL`
    are read from the environment now; `transfer_config` is a `boto3.s3.transfer.TransferConfig`
    (its multipart threshold decides which files go multipart). Returns the keys, sorted.
    """
    import boto3

    if client is None:
        # A session per call: boto3's default session is shared and not safe to create from
        # two threads at once, and a fresh one sees credentials rotated since the last upload.
        client = boto3.session.Session().client("s3")
    local_dir = Path(local_dir)
    prefix = key_prefix.strip("/")
    keys = []
    for path in files_under(local_dir):
        relative = path.relative_to(local_dir).as_posix()
        key = f"{prefix}/{relative}" if prefix else relative
        client.upload_file(str(path), bucket, key, Config=transfer_config)
        keys.append(key)
    return keys


def upload_to_hf(
    local_dir: Path,
    repo_id: str,
    path_in_repo: str,
    *,
    token: str | None = None,
    commit_message: str = "Upload checkpoint with Gantry",
    private: bool = True,
) -> str:
    """Upload `local_dir` into `path_in_repo` ("" = the root) of the Hub model repo `repo_id`.

    Creates the repo if it is missing (private by default; an existing repo keeps its
    visibility), then commits the folder to its main branch. `token` defaults to
    huggingface_hub's own lookup (`HF_TOKEN`, then the saved login). Returns the commit URL.
    """
    from huggingface_hub import HfApi

    # huggingface_hub reads HF_ENDPOINT once, at import; read it again so that a value set
    # later (a test, a launcher that sets the environment after imports) is honoured.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    # The created repo's id: a bare "name" becomes "<token's user>/name".
    commit = api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=Path(local_dir),
        path_in_repo=path_in_repo,
        commit_message=commit_message,
    )
    return commit.commit_url


def files_under(root: Path) -> list[Path]:
    """Every file under `root`, sorted (the order uploads and staging walk an export in)."""
    return sorted(p for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ destinations


class Destination(Protocol):
    """One place exports go to; `upload` raises on failure (the caller retries)."""

    def wants(self, final: bool) -> bool: ...

    def describe(self, name: str, final: bool) -> str: ...

    def upload(self, local_dir: Path, name: str, final: bool) -> None: ...


@dataclass(frozen=True)
class HubDestination:
    """Every export to a Hub repo: `final` at the root, `step_N` in the folder `step_N/`."""

    repo_id: str
    run_id: str = ""

    def wants(self, final: bool) -> bool:
        return True

    def path_in_repo(self, name: str, final: bool) -> str:
        return "" if final else name

    def describe(self, name: str, final: bool) -> str:
        return "/".join(filter(None, [f"hf://{self.repo_id}", self.path_in_repo(name, final)]))

    def upload(self, local_dir: Path, name: str, final: bool) -> None:
        run = f" of run {self.run_id}" if self.run_id else ""
        upload_to_hf(
            local_dir,
            self.repo_id,
            self.path_in_repo(name, final),
            commit_message=f"Gantry: upload {name}{run}",
        )


@dataclass(frozen=True)
class S3Destination:
    """Exports to `s3://bucket/<key_prefix>/<name>/`: only the final one, or all of them."""

    bucket: str
    key_prefix: str
    mode: S3Mode = "final"
    transfer_config: Any = None  # boto3.s3.transfer.TransferConfig; None: boto3's defaults

    def wants(self, final: bool) -> bool:
        return self.mode == "all" or final

    def _prefix(self, name: str) -> str:
        return "/".join(filter(None, [self.key_prefix.strip("/"), name]))

    def describe(self, name: str, final: bool) -> str:
        return f"s3://{self.bucket}/{self._prefix(name)}/"

    def upload(self, local_dir: Path, name: str, final: bool) -> None:
        upload_to_s3(
            local_dir, self.bucket, self._prefix(name), transfer_config=self.transfer_config
        )
