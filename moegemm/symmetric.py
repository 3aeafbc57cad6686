"""One byte buffer per rank of a process group that every rank addresses directly.

On CUDA it is torch's symmetric memory (``torch.distributed._symmetric_memory``): each peer's
allocation is mapped into this process, and a tensor view of it reads and writes over NVLink. For a
``gloo`` group of CPU processes on one host (the tests' stand-in for GPUs) each rank's buffer is a
``/dev/shm`` file that every rank maps. NVLink multicast stays off.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class SymmetricStorage:
    """``peers[r]``: rank r's buffer (uint8 ``[nbytes]``) as this rank sees it; ``peers[rank]`` is its own."""

    group: object
    rank: int
    num_ranks: int
    peers: list[torch.Tensor]
    handle: object = None  # the symmetric-memory handle (CUDA)

    @property
    def local(self) -> torch.Tensor:
        return self.peers[self.rank]

    def barrier(self) -> None:
        """Every rank's earlier writes to any buffer are visible to every rank after it (on CUDA: in
        stream order, on the current stream)."""
        if self.handle is not None:
            self.handle.barrier(channel=0)
        else:
            dist.barrier(group=self.group)


def allocate(group: object, nbytes: int, device: torch.device) -> SymmetricStorage:
    """A collective: every rank of ``group`` calls it with the same ``nbytes``."""
    rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
    if device.type == "cuda":
        import torch.distributed._symmetric_memory as symm_mem

        # Multicast objects (NVLS) are not asked for: the layer reads and writes peers point to point.
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        with torch.cuda.device(device):
            local = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
            handle = symm_mem.rendezvous(local, group)
            # The tensor may start past its allocation's base (a pool's block): peers at the same offset.
            offset = local.data_ptr() - handle.buffer_ptrs[rank]
            peers = [local if r == rank else handle.get_buffer(r, (nbytes,), torch.uint8, offset)
                     for r in range(num_ranks)]
        return SymmetricStorage(group, rank, num_ranks, peers, handle)
    if device.type != "cpu":
        raise ValueError(f"device: expected a CUDA or CPU device for a buffer across ranks, got {device}")
    # /dev/shm: a file per rank, its name shared through the group; unlinked once all have mapped it
    # (the mappings stay valid).
    path = f"/dev/shm/moegemm-{uuid.uuid4().hex}"
    local = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    names: list[str | None] = [None] * num_ranks
    dist.all_gather_object(names, path, group=group)
    peers = [local if r == rank else torch.from_file(names[r], shared=True, size=nbytes, dtype=torch.uint8)
             for r in range(num_ranks)]
    dist.barrier(group=group)
    os.unlink(path)
    return SymmetricStorage(group, rank, num_ranks, peers)


__all__ = ["SymmetricStorage", "allocate"]
