"""Runs ``python -m rmt_lightning fit`` with a probe callback that records, per rank, what the distributed
tests check: the budget and the drawn (document, position) pairs of every step, the logged losses, and
checksums of the policy and reference weights before and after. Launched by tests/test_distributed.py;
Lightning relaunches this same script for the other ranks.

Usage: python tests/distributed_probe.py OUT_DIR CKPT_PATH|none [CLI arguments of ``fit``]
"""

import contextlib
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import lightning as L
import lightning.pytorch.strategies.fsdp as lightning_fsdp
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies import FSDPStrategy

from rmt_lightning.cli import build_cli
from rmt_lightning.runtime.distributed import full_state_dict, is_sharded


def _checksums(model) -> dict[str, float]:
    # A collective under FSDP2: every rank calls it.
    return {name: float(value.double().sum()) + float(value.double().abs().sum()) for name, value in full_state_dict(model).items()}


def _full_state_dict_context_on_cpu(module, world_size, rank0_only=True):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP1 strategy, let through on CPU, for tests only.

    Lightning refuses ``strategy="fsdp"`` without a GPU, but torch's FSDP1 runs on CPU over gloo when given a CPU
    device (``wrap_fsdp1`` passes the strategy's root device). Full checkpoints are gathered without Lightning's
    offload to the CPU, which crashes FSDP1 when the parameters already are on the CPU; otherwise every line
    that runs is Lightning's.
    """

    def lightning_module_state_dict(self):
        with mock.patch.object(lightning_fsdp, "_get_full_state_dict_context", _full_state_dict_context_on_cpu):
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer):
        with mock.patch.object(lightning_fsdp, "_get_full_state_dict_context", _full_state_dict_context_on_cpu):
            return super().optimizer_state(optimizer)


class DeviceSpy:
    """Records the device of every generator the module makes, every tensor it hands the losses and every value
    it logs, while the module's own ``device`` reads as ``meta``: any code that takes its device from
    ``LightningModule.device`` instead of the strategy's root device shows up as ``meta`` (or fails)."""

    COLLECTIVES = ("all_reduce", "barrier", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object",
                   "reduce_scatter_tensor")

    def __init__(self):
        self.seen = {"generator": set(), "loss_inputs": set(), "logged": set()}
        self.collectives = {"calls": 0, "in_rollouts": 0}
        """Calls of torch.distributed's collectives: all of them, and the all-reduces and barriers (how processes
        agree, as ``distributed.all_ranks`` does) made while a rollout generates. FSDP's own gathers are not
        counted there: gathering the weights once per rollout is expected (tests/test_decoding_weights.py counts
        those per rollout)."""
        self._in_rollout = False

    def _tensors(self, kind, values):
        for value in values:
            self.seen[kind].add(str(value.device) if isinstance(value, torch.Tensor) else type(value).__name__)

    def patches(self):
        from rmt_lightning.grpo_module import GRPOModule
        from rmt_lightning.rl import losses

        spy = self

        def tensors_in(value):
            # The losses take tensors as they are and inside their typed batches (RLBatch, CompletionBatch).
            if isinstance(value, torch.Tensor):
                yield value
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                for field in dataclasses.fields(value):
                    yield from tensors_in(getattr(value, field.name))

        def recording(function):
            def wrapper(*args, **kwargs):
                spy._tensors("loss_inputs", [t for a in (*args, *kwargs.values()) for t in tensors_in(a)])
                return function(*args, **kwargs)
            return wrapper

        make_generator, log_dict = GRPOModule._generator, GRPOModule.log_dict

        def generator(module):
            made = make_generator(module)
            spy.seen["generator"].add(str(made.device))
            return made

        def logged(module, values, *args, **kwargs):
            spy._tensors("logged", values.values())
            return log_dict(module, values, *args, **kwargs)

        import rmt_lightning.grpo_module as module_file

        def counted(function, agreement: bool):
            def wrapper(*args, **kwargs):
                spy.collectives["calls"] += 1
                spy.collectives["in_rollouts"] += spy._in_rollout and agreement
                return function(*args, **kwargs)
            return wrapper

        generate_group = module_file.generate_group

        def generating(*args, **kwargs):
            spy._in_rollout = True
            try:
                return generate_group(*args, **kwargs)
            finally:
                spy._in_rollout = False

        for name in self.COLLECTIVES:
            agreement = name in ("all_reduce", "barrier")
            yield mock.patch.object(torch.distributed, name, counted(getattr(torch.distributed, name), agreement))
        yield mock.patch.object(module_file, "generate_group", generating)
        yield mock.patch.object(GRPOModule, "device", new_callable=mock.PropertyMock, return_value=torch.device("meta"))
        yield mock.patch.object(GRPOModule, "_generator", generator)
        yield mock.patch.object(GRPOModule, "log_dict", logged)
        for name in ("rl_backward", "ntp_backward", "demonstrations_backward", "policy_logprobs"):
            yield mock.patch.object(losses, name, recording(getattr(losses, name)))


class Probe(L.Callback):
    def __init__(self, out_dir: str, devices: DeviceSpy | None = None):
        self.out_dir = out_dir
        self.record = {"steps": []}
        self.devices = devices

    def on_train_start(self, trainer, pl_module):
        self.record["start_step"] = trainer.global_step
        self.record["world_size"] = trainer.world_size
        self.record["root_device"] = str(trainer.strategy.root_device)
        params = [pl_module.policy.parameters()] + ([pl_module.reference.parameters()] if pl_module.reference else [])
        self.record["parameter_devices"] = sorted({str(p.device) for group in params for p in group})
        mesh = getattr(next(pl_module.policy.parameters()), "device_mesh", None)
        self.record["mesh_device_type"] = None if mesh is None else mesh.device_type
        self.record["policy_sharded"] = is_sharded(pl_module.policy)
        self.record["policy_before"] = _checksums(pl_module.policy)
        if pl_module.reference is not None:
            self.record["reference_sharded"] = is_sharded(pl_module.reference)
            self.record["reference_before"] = _checksums(pl_module.reference)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step_started = time.perf_counter()
        self.record["steps"].append({
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "budget": int(getattr(pl_module, "budget", 0)),  # the question task has none
            "draws": ([[int(d), int(p)] for d, p in zip(batch.position_documents.tolist(), batch.positions.tolist())]
                      if hasattr(batch, "positions") else [[int(q)] for q in batch.question_ids.tolist()]),
        })

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.record["steps"][-1]["loss"] = float(metrics["train/loss"])
        self.record["steps"][-1]["reward"] = float(metrics.get("train/reward", math.nan))
        self.record["steps"][-1]["seconds"] = time.perf_counter() - self.step_started

    def on_train_end(self, trainer, pl_module):
        self.record["policy_after"] = _checksums(pl_module.policy)
        if pl_module.reference is not None:
            self.record["reference_after"] = _checksums(pl_module.reference)
        if torch.cuda.is_available():
            self.record["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
        if self.devices is not None:
            self.record["devices_seen"] = {kind: sorted(found) for kind, found in self.devices.seen.items()}
            self.record["collectives"] = dict(self.devices.collectives)
        path = os.path.join(self.out_dir, f"probe_rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump(self.record, f)


def run_probe(workdir: Path, out: Path, args: list[str], processes: int = 2, ckpt: str = "none") -> list[dict]:
    """Run ``fit`` with the probe in ``workdir`` (``args``: LightningCLI arguments, ``--trainer.devices`` included)
    and return the record of each of the ``processes`` ranks."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), str(out), ckpt, *args]
    # The repository first, then whatever the caller put on the path (packages installed beside the interpreter's).
    paths = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return [json.loads((out / f"probe_rank{rank}.json").read_text()) for rank in range(processes)]


def free_port() -> int:
    """A free TCP port on localhost, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target, *args, processes: int = 2, timeout: float = 300) -> None:
    """Run ``target(rank, port, *args)`` in ``processes`` spawned processes, the ranks of one process group; fails
    when one is still running after ``timeout`` seconds (waiting on a collective another rank skipped) or fails."""
    context = mp.get_context("spawn")
    port = free_port()
    workers = [context.Process(target=target, args=(rank, port, *args)) for rank in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=timeout)
    hung = [rank for rank, worker in enumerate(workers) if worker.is_alive()]
    for rank in hung:
        workers[rank].kill()
    assert not hung, f"rank(s) {hung} still waiting after {timeout} s: one rank skipped a collective the others ran"
    assert all(worker.exitcode == 0 for worker in workers), [worker.exitcode for worker in workers]


def assert_trained(records: list[dict]) -> None:
    """Every rank's losses are finite; every policy weight moved (the tied ``lm_head.weight`` may be stored as
    the embedding) and the reference did not, by rank 0's checksums of the full weights."""
    for record in records:
        assert all(math.isfinite(s["loss"]) for s in record["steps"])
    before, after = records[0]["policy_before"], records[0]["policy_after"]
    assert len(before) > 10
    moved = {name for name in before if before[name] != after[name]}
    assert moved >= {n for n in before if n != "lm_head.weight"}, "some policy weights did not move"
    assert records[0]["reference_after"] == records[0]["reference_before"]


def _first_token_is_even(module, rollout, references):
    """The question task's toy reward for a model that never writes an answer: 1 where a completion's first token
    has an even id (set by RMT_PROBE_TOY_REWARD=1)."""
    group = len(rollout.texts) // len(references)
    correct = (rollout.completion_ids[:, 0] % 2 == 0).float().view(len(references), group)
    return correct, torch.ones_like(correct), 0


def main() -> None:
    out_dir, ckpt_path, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    devices = DeviceSpy()
    with contextlib.ExitStack() as patches:
        for patch in devices.patches():
            patches.enter_context(patch)
        if os.environ.get("RMT_PROBE_TOY_REWARD") == "1":
            from rmt_lightning.posttrain import PostTrainModule

            patches.enter_context(mock.patch.object(PostTrainModule, "verify", _first_token_is_even))
        cli = build_cli(args, run=False)
        cli.trainer.callbacks.append(Probe(out_dir, devices))
        ckpt_path = None if ckpt_path == "none" else ckpt_path
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)


if __name__ == "__main__":
    main()
