"""Recover a pruned language model by distillation from the dense one, in one process or under
`torchrun --nproc-per-node N` with PyTorch's DistributedDataParallel (gloo on CPU, NCCL on GPU).

The loss curve does not depend on N: every step draws one global batch from a generator seeded
the same on every rank, each rank takes its 1/N slice (the batch size must divide), DDP averages
the gradients (the mean of equal-sized slices' mean losses is the global mean), and the logged
loss is the all-reduced mean. So N processes take the steps one process takes, up to float
summation order.

Loss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * next-byte cross-entropy, per token
(Hinton et al. 2015), Adam with cosine decay.

    .venv/bin/python benchmarks/llm_recovery.py --quick --out /tmp/one.json
    .venv/bin/torchrun --nproc-per-node 2 benchmarks/llm_recovery.py --quick --out /tmp/two.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from train_tiny_llama import add_settings_arguments, corpus, load_or_train, random_batch, settings_from

import sparsefx

log = logging.getLogger("sparsefx.bench.llm_recovery")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 temperature: float, alpha: float) -> torch.Tensor:
    s, t = student_logits.flatten(0, 1).float(), teacher_logits.flatten(0, 1).float()
    soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                    reduction="batchmean", log_target=True)
    return alpha * temperature ** 2 * soft + (1 - alpha) * F.cross_entropy(s, targets.flatten())


def world() -> tuple[int, int]:
    """(rank, world size): from torchrun's environment, (0, 1) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def recover(student: nn.Module, teacher: nn.Module, train_data: torch.Tensor, steps: int, batch: int, seq: int,
            lr: float = 1e-3, temperature: float = 2.0, alpha: float = 0.5, seed: int = 0,
            device: str = "cpu") -> list[float]:
    """Distil `teacher` into `student` in place for `steps`; returns the global loss per step.
    Under torchrun the process group must be initialised (see `main`); each rank trains on its
    slice of the global batch."""
    rank, size = world()
    if batch % size:
        raise ValueError(f"batch {batch} must divide by the {size} processes")
    student.to(device).train()
    teacher.to(device).eval()
    model = DistributedDataParallel(student) if size > 1 else student
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)  # the same global batches on every rank
    curve = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
        window = random_batch(train_data, seq, batch, generator)
        mine = window.chunk(size)[rank].to(device)
        inputs, targets = mine[:, :-1], mine[:, 1:]
        with torch.no_grad():
            teacher_logits = teacher(inputs, use_cache=False).logits
        loss = distill_loss(model(inputs, use_cache=False).logits, teacher_logits, targets, temperature, alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        optimizer.step()
        logged = loss.detach().clone()
        if size > 1:
            dist.all_reduce(logged)
            logged /= size
        curve.append(logged.item())
    student.eval()
    return curve


def quick_student(model: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """The --quick student: half of every MLP removed (Wanda on the calibration batches)."""
    example = (calibration[0][:1],)
    layers = len(model.model.layers)
    return sparsefx.prune(model, example, ratio={f"model.layers.{i}.mlp.up_proj": 0.5 for i in range(layers)},
                          importance="wanda", calibration=calibration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_settings_arguments(parser)
    parser.add_argument("--recover-steps", type=int, default=None, help="steps (default 200, --quick 6)")
    parser.add_argument("--recover-lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None, help="write the loss curve here (JSON)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rank, size = world()
    device = "cpu"
    if size > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    s = settings_from(args)
    if rank == 0:
        teacher, _ = load_or_train(s)  # trains and caches once; the other ranks wait and load it
    if size > 1:
        dist.barrier()
    if rank != 0:
        teacher, _ = load_or_train(s)
    train_data, _ = corpus()
    g = torch.Generator().manual_seed(1)
    calibration = [random_batch(train_data, s.seq, 4, g)[:, :-1] for _ in range(2)]
    student = quick_student(teacher, calibration)
    steps = args.recover_steps or (6 if args.quick else 200)
    started = time.perf_counter()
    curve = recover(student, teacher, train_data, steps, batch=s.batch, seq=s.seq, lr=args.recover_lr,
                    device=device)
    if rank == 0:
        result = {"processes": size, "steps": steps, "batch": s.batch, "seq": s.seq, "loss": curve,
                  "parameters": {"dense": sparsefx.count_params(teacher), "pruned": sparsefx.count_params(student)},
                  "seconds": round(time.perf_counter() - started, 1)}
        log.info("loss curve (%d process%s): %s", size, "es" if size > 1 else "", [round(v, 4) for v in curve])
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    if size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
