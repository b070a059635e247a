"""Several processes, one model: data parallelism and FSDP with torch.distributed, as `torchrun` launches them.

    torchrun --nproc_per_node 8 tvaccine.py ...      # also attack.py and evaluate.py; add --fsdp to shard weights

- `init` / `finish`: the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR):
  NCCL on GPUs (rank r on cuda:LOCAL_RANK), gloo on CPUs. Without torchrun nothing is initialised, and every
  helper below is a no-op, so a plain `python tvaccine.py` computes exactly what it did before.
- The global batch (`--batch-size`) is split across ranks: every rank draws the same seeded permutation and
  takes its contiguous rows of each batch (`local_rows`), so the learning rate means the same at any N.
- Exactness: each rank divides its loss sum by the GLOBAL count of labelled tokens (`global_target_count`),
  gradients are SUM-all-reduced (`all_reduce_grads`), squared norms are summed over ranks before a square root
  (`global_norm`): the results are the single-process ones up to the order of float additions.
- FSDP (`shard_model`): the frozen base weights are sharded with `torch.distributed.fsdp.fully_shard` (FSDP2);
  the LoRA factors stay whole on every rank (they are tiny) and are data-parallel like everything else.
- Everything that writes (run folder, adapter, results, progress bars) runs on rank 0 only (`is_main`).
"""
from __future__ import annotations

import gc
import os
import socket

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------------------------
# The process group


def init():
    """Join torchrun's process group; without torchrun (no WORLD_SIZE in the environment) do nothing."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())  # before any CUDA work: NCCL and our tensors use this GPU
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")


def free_port() -> int:
    """A free TCP port on this machine, for the rendezvous of a torchrun launched on it (tests, gpu_check.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish():
    """Leave the process group. FSDP-sharded modules sit in reference cycles (module <-> FSDP state <-> hooks) that
    hold the group; collected only at interpreter exit, after the group is destroyed, they made gloo abort the
    process now and then ("terminate called without an active exception", 3 of 20 launches of a 2-rank test
    script; 0 of 60 with this collect). So free them first, while the group is still alive."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def initialized() -> bool:
    return dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def parallel() -> bool:
    """True when there is something to synchronise: more than one process."""
    return world_size() > 1


def device(requested: str | None) -> torch.device:
    """The device this rank computes on: --device (default cuda if available); under torchrun cuda:LOCAL_RANK."""
    chosen = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dist.is_initialized() and chosen.type == "cuda":
        return torch.device("cuda", local_rank())
    return chosen


def _comm_device() -> torch.device:
    """Where tensors must live for a collective: NCCL only moves GPU tensors."""
    return torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# Splitting the global batch


def check_split(n_examples: int, batch_size: int, flag: str, what: str):
    """Before any step: every global batch must split over the ranks, full ones evenly (batch_size / N rows
    each), and the last, partial batch of an epoch (n_examples % batch_size rows) into at least a row each."""
    n = world_size()
    if batch_size % n:
        raise ValueError(f"{flag} {batch_size} is not divisible by the {n} processes: each process takes "
                         f"{flag} / N rows of every global batch; choose a multiple of {n}")
    if 0 < n_examples % batch_size < n:
        raise ValueError(f"{what} has {n_examples} examples, so the last batch of each epoch holds "
                         f"{n_examples % batch_size} row(s): fewer than the {n} processes; change the data size "
                         f"or {flag}")


def local_rows(batch: dict) -> dict:
    """This rank's contiguous rows of a global batch (the last, partial batch of an epoch is split as evenly as
    possible). Padding columns are kept, so every rank sees the batch exactly as a single process would."""
    if not parallel():
        return batch
    B = next(iter(batch.values())).shape[0]
    if B < world_size():  # check_split refuses such data before training starts
        raise ValueError(f"a batch of {B} rows cannot be split over {world_size()} processes")
    rows = torch.tensor_split(torch.arange(B), world_size())[rank()]
    return {k: v[rows[0]:rows[-1] + 1] for k, v in batch.items()}


def global_target_count(labels: torch.Tensor) -> int | None:
    """The labelled-token count of the whole global batch (None in one process: model.loss takes its own mean).

    Every rank divides its loss sum by this count, so the per-rank losses (and gradients) add up to the mean
    over the global batch, whatever the ranks' own counts are."""
    if not parallel():
        return None
    count = (labels[:, 1:] != -100).sum().to(_comm_device())
    dist.all_reduce(count)
    return int(count)


# ----------------------------------------------------------------------------------------------------------------
# Reductions


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (a new tensor on value's device); value itself in one process."""
    if not parallel():
        return value
    total = value.detach().to(_comm_device(), copy=True)
    dist.all_reduce(total)
    return total.to(value.device)


def global_norm(local_squared_norm: torch.Tensor) -> torch.Tensor:
    """sqrt of the sum over ranks of each rank's squared Frobenius norm: the norm of the global-batch tensor."""
    return torch.sqrt(all_reduce_sum(local_squared_norm))


def sum_floats(values: dict) -> dict:
    """Python floats summed over ranks (the per-rank shares of a loss); one collective for all of them."""
    if not parallel() or not values:
        return values
    total = all_reduce_sum(torch.tensor(list(values.values()), dtype=torch.float64))
    return dict(zip(values, total.tolist()))


def all_reduce_grads(params: list[torch.nn.Parameter]):
    """Sum the gradients over ranks in one flat buffer (each rank's loss is already its share of the global
    mean, so the sum is the single-process gradient). Every rank must hold gradients for the same parameters."""
    if not parallel():
        return
    grads = [p.grad for p in params if p.grad is not None]
    count = all_reduce_sum(torch.tensor(float(len(grads))))
    if int(count) != len(grads) * world_size():
        raise RuntimeError(f"rank {rank()} has gradients for {len(grads)} parameters, the others do not: the "
                           "ranks trained different layers")
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    for g, reduced in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(reduced.view_as(g))


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (e.g. a Ctrl-C that reached one process first)."""
    if not parallel():
        return flag
    return bool(all_reduce_sum(torch.tensor(float(flag))) > 0)


def max_over_ranks(value: int) -> int:
    if not parallel():
        return value
    t = torch.tensor(value, dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def broadcast_from_main(tensors: list[torch.Tensor]):
    """Overwrite each tensor with rank 0's values (a common starting point, as DDP does at construction)."""
    if not parallel():
        return
    for t in tensors:
        buffer = t.detach().to(_comm_device(), copy=True)
        dist.broadcast(buffer, src=0)
        with torch.no_grad():
            t.copy_(buffer)


def barrier():
    """Wait for every rank (e.g. until rank 0 has written the outputs the next stage reads)."""
    if parallel():
        dist.barrier()


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled in memory, never read from disk)."""
    if not parallel():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def seed_per_rank(seed: int):
    """Different dropout masks on each rank's rows (identical seeds would draw the same masks on every rank).
    Called after the model and its LoRA are built, which draw from the common seed."""
    if parallel():
        torch.manual_seed(seed + 1_000_003 * rank())


# ----------------------------------------------------------------------------------------------------------------
# FSDP: the frozen base weights sharded over the ranks


def shard_model(model, trainable: list[torch.nn.Parameter], device: torch.device):
    """fully_shard each attention and MLP sub-block, then the root (embeddings, norms, LM head); `trainable` (the
    LoRA factors) are left out of FSDP: whole on every rank, their gradients all-reduced like in data parallel.

    The sub-blocks, not the Blocks, are the units because the layer loop calls block.attention / feed_forward,
    never Block.forward, and FSDP gathers a unit's weights in the pre-forward hook of the module it wraps; the
    loop calls forward_hidden, not forward, so it is registered as a forward method of the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world_size(),))
    ignored = set(trainable)
    for block in model.layers:
        fully_shard(block.self_attn, mesh=mesh, ignored_params=ignored)
        fully_shard(block.mlp, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    register_fsdp_forward_method(model, "forward_hidden")
    with torch.no_grad():  # FSDP moved its shards to the mesh's device; the ignored LoRA factors stay put
        for p in trainable:
            p.data = p.data.to(device)
    model.inv_freq = model.inv_freq.to(device)
    return model
