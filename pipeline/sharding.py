"""Sharded training (PyTorch FSDP2, `fully_shard`) for a language model trained fully (`llm: full`)
that does not fit one GPU with its optimizer state (Vicuna-7B: 111 GB of fp32 weights, gradients
and AdamW moments; see the README's memory table):

    torchrun --nproc_per_node 8 run_pipeline.py --config C --stages train --set run.sharding=fsdp

Each transformer block of the language model is its own FSDP unit (its parameters are gathered
just before its forward and freed after), the rest of the model (Q-Former, query tokens,
projection, embeddings, head) one root unit. Gradients, AdamW moments and master weights live
sharded: 1/N per process.

What is gathered, and when: validation, `best/` and checkpoints run on full tensors inside
`unsharded(model)` (every rank enters it together; inside, no collective runs, so ranks may
generate captions of different lengths). Checkpoints hold full tensors in the same format as
unsharded runs: a sharded run resumes sharded or not, on any number of processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def shard(root: torch.nn.Module, lm: torch.nn.Module) -> torch.nn.Module:
    """`fully_shard` each transformer block of `lm`, then `root` (in place): `root` is what the
    training loop calls (the objective around the model), so every parameter outside the blocks is
    gathered once per call, whatever methods of the model the objective uses (SCST: generate)."""
    blocks = set(getattr(lm, "_no_split_modules", None) or ())  # transformers: LlamaDecoderLayer, T5Block...
    units = [m for m in lm.modules() if type(m).__name__ in blocks]
    if not units:
        raise ValueError(f"run.sharding=fsdp: no transformer blocks found in {type(lm).__name__}")
    for unit in units:
        fully_shard(unit)
    fully_shard(root)
    # FSDP2 takes the first module whose forward runs as the root; validation (inside `unsharded`)
    # may call a block's forward before the root's, so initialise the root now (private API, FSDP2).
    root._get_fsdp_state()._lazy_init()
    return root


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def unsharded(model: torch.nn.Module) -> Iterator[None]:
    """Full parameters on every rank for the duration (a no-op for an unsharded model).

    Every rank must enter together (one all-gather per unit); inside, forwards run no collective.
    """
    if not is_sharded(model):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)  # recurses into every unit
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        for unit in units:
            unit.reshard()


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with every sharded moment gathered (collective: every rank calls)."""
    state = optimizer.state_dict()
    state["state"] = {i: dict(e) for i, e in state["state"].items()}  # its entries are the live state
    for index in sorted(state["state"]):
        entry = state["state"][index]
        for key in sorted(entry):
            if isinstance(entry[key], DTensor):
                entry[key] = entry[key].full_tensor()
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state; moments of sharded parameters are sharded like them."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                continue
            entry = optimizer.state.get(param, {})
            for key, value in entry.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.shape:
                    entry[key] = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)


def load_full_tensor(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into a parameter, sharded like it when it is a DTensor."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            param.copy_(distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements))
        else:
            param.copy_(value)
