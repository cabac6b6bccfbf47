"""Policy checkpoints (policy/checkpoint.py): kill-and-resume gives the uninterrupted run's
losses and weights, half-written checkpoints are never resumed from, async saves write the
state of the moment `save` was called.

The distributed tests run a small FSDP2 training loop on 2 gloo ranks (SCRIPT below) in
several modes: `full` trains 6 steps; `crash` saves at step 3 and dies with os._exit (async:
also starts a save at step 4 and dies while it is written); `resume` loads the latest complete
checkpoint and trains to step 6; `reshard` loads that on 1 rank; `overlap` changes the weights
while an async save is in flight.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from gantry.run.checkpoints import (
    CHECKPOINTS,
    is_complete,
    latest_complete,
    mark_complete,
    prune_step_dirs,
    step_dir,
)
from policy.checkpoint import DONE, CheckpointError, check_world_size, read_done
from tests.distributed_helpers import run_ranks

SCRIPT = textwrap.dedent(
    """
    import json, os, random, sys, time
    from pathlib import Path

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from gantry.run.checkpoints import CHECKPOINTS, latest_complete, mark_complete, step_dir
    from policy.checkpoint import CheckpointError, PolicyCheckpointer
    from policy.parallel import (
        ParallelDims, ShardingOptions, build_mesh, init_distributed, load_sharded_model,
    )

    STEPS, CRASH_AT, WARMUP = 6, 3, 4


    def batch(step, rank, vocab):  # fixed data per (step, rank), independent of the global RNG
        gen = torch.Generator().manual_seed(1000 * step + rank)
        return torch.randint(0, vocab, (2, 12), generator=gen)


    def train_step(model, optimizer, scheduler, step, rank):
        ids = batch(step, rank, model.config.vocab_size)
        logits = model(input_ids=ids).logits
        # Both RNGs are consumed every step, so a resume that does not restore them differs.
        logits = logits + 0.5 * torch.randn_like(logits)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss = loss * (0.5 + random.random())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()


    def full_weights(model):  # a collective; rank 0 gets the full tensors
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}


    def main():
        run, model_dir, out, mode, async_type = sys.argv[1:6]
        out, root = Path(out), Path(out) / CHECKPOINTS
        env = init_distributed()
        torch.manual_seed(1234 + env.rank)
        random.seed(99 + env.rank)
        model = load_sharded_model(
            model_dir, build_mesh(ParallelDims(1, env.world_size), env.device), ShardingOptions()
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / WARMUP)
        )
        ckpt = PolicyCheckpointer(async_mode=mode == "async", async_type=async_type)
        state = dict(model=model, optimizer=optimizer, scheduler=scheduler)

        def save(step):
            path = step_dir(root, step) / "policy"
            ckpt.save(path, **state, step=step, extra={"data_index": step})
            return path

        def durable(path, reported=()):  # the worker and controller, once a save is on disk
            assert [*reported, *ckpt.wait()] == [path]  # every save is reported once
            if env.rank == 0:
                assert (path / "DONE").is_file()
                mark_complete(path.parent, int(path.parent.name[5:]))
            dist.barrier()

        losses, first = {}, 1
        if run == "resume":
            latest = latest_complete(root)
            step, extra = ckpt.load(latest / "policy", **state)
            assert (step, extra) == (CRASH_AT, {"data_index": CRASH_AT}), (step, extra)
            first = step + 1
        if run == "overlap":
            overlap(ckpt, save, model, optimizer, scheduler, env, out)
            return
        if run == "reshard":  # on another number of ranks than saved it
            reshard(ckpt, latest_complete(root) / "policy", state, env, out)
            return
        for step in range(first, STEPS + 1):
            losses[step] = train_step(model, optimizer, scheduler, step, env.rank)
            if run == "crash" and step == CRASH_AT:
                path = save(step)
            if run == "crash" and step == CRASH_AT + 1:
                durable(path, ckpt.poll())  # async: step 4 trained while step 3 was written
                (out / f"losses_rank{env.rank}.json").write_text(json.dumps(losses))
                if mode == "async":  # and die while step 4 is being written
                    partial = save(step) / f"__{env.rank}_0.distcp"
                    while not partial.exists():
                        time.sleep(0.001)
                os._exit(0)  # a crash: no clean-up, no atexit, no process group shutdown
        (out / f"losses_rank{env.rank}.json").write_text(json.dumps(losses))
        weights = full_weights(model)
        if env.rank == 0:
            torch.save(weights, out / "weights.pt")
        if run == "resume":
            durable(save(STEPS))
        ckpt.close()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # torch 2.13's gloo can abort at shutdown (see policy/__main__.py)


    def overlap(ckpt, save, model, optimizer, scheduler, env, out):
        train_step(model, optimizer, scheduler, 1, env.rank)
        before = full_weights(model)
        path = save(1)
        with torch.no_grad():  # right away: the writer has not even agreed a plan yet
            for p in model.parameters():
                p.mul_(-2.0)
        in_flight = not ckpt._inflight.future.done()
        train_step(model, optimizer, scheduler, 2, env.rank)
        ckpt.wait()
        after = full_weights(model)
        ckpt.load(path, model=model, optimizer=optimizer, scheduler=scheduler)
        loaded = full_weights(model)
        if env.rank == 0:
            torch.save({"before": before, "after": after, "loaded": loaded}, out / "overlap.pt")
        (out / f"in_flight_rank{env.rank}.json").write_text(json.dumps(in_flight))
        ckpt.close()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # torch 2.13's gloo can abort at shutdown (see policy/__main__.py)


    def reshard(ckpt, path, state, env, out):
        try:
            ckpt.load(path, **state)
            raise AssertionError("a checkpoint of another world size was loaded")
        except CheckpointError as error:
            assert "saved by 2 policy ranks" in str(error), error
        step, _ = ckpt.load(path, **state, allow_reshard=True)
        assert step == STEPS, step
        weights = full_weights(state["model"])
        if env.rank == 0:
            torch.save(weights, out / "weights.pt")
        ckpt.close()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # torch 2.13's gloo can abort at shutdown (see policy/__main__.py)


    if __name__ == "__main__":  # the process-based writer re-imports this file: guard it
        main()
    """
)

# The process writer spawns a writer process per rank at the first save: slower to test.
MODES = [
    pytest.param("sync", "thread", id="sync"),
    pytest.param("async", "thread", id="async-thread"),
    pytest.param("async", "process", id="async-process", marks=pytest.mark.slow),
]


def _run(tmp_path, run: str, model_dir, out, mode="sync", async_type="thread", nproc=2):
    script = tmp_path / "checkpoint_script.py"
    script.write_text(SCRIPT)
    out.mkdir(parents=True, exist_ok=True)
    return run_ranks(
        script, nproc, [run, model_dir, out, mode, async_type], timeout=240,
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def _losses(out, rank: int) -> dict[int, float]:
    return {int(k): v for k, v in json.loads((out / f"losses_rank{rank}.json").read_text()).items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    _run(tmp, "full", tiny_model_dir, tmp / "out")
    return tmp / "out"


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("mode", "async_type"), MODES)
def test_kill_and_resume_matches_the_uninterrupted_run(
    tmp_path, tiny_model_dir, uninterrupted, mode, async_type
):
    crashed, resumed = tmp_path / "run", tmp_path / "resumed"
    _run(tmp_path, "crash", tiny_model_dir, crashed, mode, async_type)
    root = crashed / CHECKPOINTS
    assert latest_complete(root) == step_dir(root, 3)
    assert read_done(step_dir(root, 3) / "policy")["world_size"] == 2
    if mode == "async":  # the save at step 4 was killed: never complete, never DONE
        assert step_dir(root, 4).is_dir() and not is_complete(step_dir(root, 4))
        assert not (step_dir(root, 4) / "policy" / DONE).exists()

    resumed.mkdir()
    (resumed / CHECKPOINTS).symlink_to(root)  # resume writes its checkpoints there too
    _run(tmp_path, "resume", tiny_model_dir, resumed, mode, async_type)

    for rank in (0, 1):
        full, before, after = (
            _losses(uninterrupted, rank),
            _losses(crashed, rank),
            _losses(resumed, rank),
        )
        assert before == {s: full[s] for s in (1, 2, 3, 4)}, rank
        assert after == {s: full[s] for s in (4, 5, 6)}, rank
    expected = torch.load(uninterrupted / "weights.pt")
    got = torch.load(resumed / "weights.pt")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name

    # The resumed run completed step 6: the older checkpoint and the killed one go.
    deleted = prune_step_dirs(root, keep=1, complete_only=True)
    assert deleted == [step_dir(root, s) for s in ((3, 4) if mode == "async" else (3,))]
    assert [p.name for p in root.iterdir()] == ["step_6"]

    if mode == "sync":  # 1 rank loads the 2 ranks' checkpoint: refused, unless resharding
        one = tmp_path / "one-rank"
        one.mkdir()
        (one / CHECKPOINTS).symlink_to(root)
        _run(tmp_path, "reshard", tiny_model_dir, one, nproc=1)
        resharded = torch.load(one / "weights.pt")
        for name, tensor in got.items():
            assert torch.equal(resharded[name], tensor), name


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(240)
@pytest.mark.parametrize("async_type", ["thread", "process"])
def test_async_save_writes_the_state_of_the_save_call(tmp_path, tiny_model_dir, async_type):
    out = tmp_path / "out"
    _run(tmp_path, "overlap", tiny_model_dir, out, "async", async_type)
    # The weights were changed while the writer was still at work (else this proves nothing).
    assert all(json.loads((out / f"in_flight_rank{r}.json").read_text()) for r in (0, 1))
    result = torch.load(out / "overlap.pt")
    for name, tensor in result["before"].items():
        assert torch.equal(result["loaded"][name], tensor), name
        assert not torch.equal(result["after"][name], tensor), name


def test_half_written_checkpoints_are_never_resumed_and_get_pruned(tmp_path):
    root = tmp_path / CHECKPOINTS
    for step in (2, 3, 5):  # policy data everywhere; only step 3 finished
        policy = step_dir(root, step) / "policy"
        policy.mkdir(parents=True)
        (policy / "__0_0.distcp").write_bytes(b"\0" * 100)  # a rank's file, cut short
    (step_dir(root, 3) / "policy" / DONE).write_text(json.dumps({"step": 3, "world_size": 2}))
    mark_complete(step_dir(root, 3), 3)
    (step_dir(root, 5) / "policy" / DONE).write_text("{}")  # policy done, controller died

    assert latest_complete(root) == step_dir(root, 3)
    with pytest.raises(CheckpointError, match=str(step_dir(root, 2) / "policy")):
        read_done(step_dir(root, 2) / "policy")
    # step_2 never finished and is older than a complete one; step_5 may still be in progress.
    assert prune_step_dirs(root, keep=1, complete_only=True) == [step_dir(root, 2)]
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_5"]


def test_a_different_world_size_is_refused_unless_resharding(tmp_path):
    assert check_world_size(tmp_path, 2, 2, allow_reshard=False)
    with pytest.raises(CheckpointError, match=rf"{tmp_path}.* saved by 2 policy ranks .* has 4"):
        check_world_size(tmp_path, 2, 4, allow_reshard=False)
    assert not check_world_size(tmp_path, 2, 4, allow_reshard=True)  # loads, RNG not restored
