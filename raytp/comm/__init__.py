"""Collectives: the backends, the autograd-aware region ops and the collective counter."""

from raytp.comm.backend import Communicator, TorchCommunicator
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
    "CollectiveCounter",
    "CollectiveRecord",
    "Communicator",
    "TorchCommunicator",
    "all_gather_seq",
    "all_to_all",
    "comm_tag",
    "copy_to",
    "count_collectives",
    "gather_from",
    "reduce_from",
    "reduce_scatter_seq",
    "scatter_to",
]
