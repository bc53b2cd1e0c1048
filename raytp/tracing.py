"""Where a rank is: which layer issued its collectives, and the last one it entered.

:func:`tag_submodules` labels every collective with the qualified name of the TP
layer that issued it (forward hooks that only set a label; the backward reuses the
forward's label), so that a stuck rank can be reported as, for example,
"rank 1 is in all_reduce #1234 (layers.3.mlp.fc_out)".
"""

from __future__ import annotations

import torch
from torch import nn

from raytp.comm.counter import comm_tag
from raytp.mesh import DeviceMesh


def tag_submodules(model: nn.Module) -> list:
    """Label the collectives of each TP layer of ``model`` with its qualified name.
    Returns the hook handles (``handle.remove()`` undoes it)."""
    handles = []
    for name, module in model.named_modules():
        if name and hasattr(module, "mesh") and not any(True for _ in module.children()):
            module._raytp_name = name
            handles.append(module.register_forward_pre_hook(_enter))
            handles.append(module.register_forward_hook(_leave))
    return handles


# Both hooks are one function for every layer, opaque to torch.compile: a compiled block
# calls them eager, and is not recompiled for each layer's name (raytp.compile).
@torch.compiler.disable
def _enter(module, args):
    module._raytp_tag = comm_tag(module._raytp_name)
    module._raytp_tag.__enter__()


@torch.compiler.disable
def _leave(module, args, output):
    tag = getattr(module, "_raytp_tag", None)
    if tag is not None:
        tag.__exit__(None, None, None)
        module._raytp_tag = None


def where(mesh: DeviceMesh | None) -> dict:
    """The last collective this rank issued on each of its groups (see
    :meth:`raytp.comm.Communicator.where`); safe to call from another thread."""
    if mesh is None:
        return {}
    return {name: comm.where() for name, comm in (("tp", mesh.tp_comm), ("dp", mesh.dp_comm))}
