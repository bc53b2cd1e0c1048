"""Collectives: the communicators, the backends by name (rendezvous and join), the
autograd-aware region ops and the collective counter."""

from raytp.comm.backend import Communicator, TorchCommunicator
from raytp.comm.backends import Backend, backend_names, get_backend, register_backend, unregister_backend
from raytp.comm.counter import CollectiveCounter, CollectiveRecord, comm_tag, count_collectives
from raytp.comm.ops import (
    all_gather_seq,
    all_to_all,
    copy_to,
    gather_from,
    reduce_from,
    reduce_scatter_seq,
    scatter_to,
)

__all__ = [
    "Backend",
    "CollectiveCounter",
    "CollectiveRecord",
    "Communicator",
    "TorchCommunicator",
    "all_gather_seq",
    "all_to_all",
    "backend_names",
    "comm_tag",
    "copy_to",
    "count_collectives",
    "gather_from",
    "get_backend",
    "reduce_from",
    "reduce_scatter_seq",
    "register_backend",
    "scatter_to",
    "unregister_backend",
]
