"""The one path from a public operation to its kernel or its reference.

An ``Op`` caches, per call signature (dtypes, shapes, strides and devices of the tensors, the other
arguments, and the launch settings), the *bound call* its family's ``bind`` made after the arguments
passed its ``check``. A repeated signature costs one tuple and one dict lookup before the bound call;
the bound call does only what changes between calls (data pointers: alignment, overlap, launch).
Under ``torch.compile`` an op runs as the torch custom op ``torch.ops.moegemm.<name>``; every ``Op``
is registered as one, from its schema (``register_custom_ops``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import device, env
from ..jit.runtime import PlanCache

Tensor = torch.Tensor

_CHECK_GROUPS = env.Toggle("MOEGEMM_CHECK_GROUPS")


def set_check_groups(enabled: bool) -> None:
    """Have the grouped GEMMs read their layout / ``masked_m`` on the host before each launch (a
    synchronisation) and raise, naming the entries, on values the kernels would treat as padding or
    clamp. Default: the ``MOEGEMM_CHECK_GROUPS`` environment variable."""
    _CHECK_GROUPS.set(enabled)


def get_check_groups() -> bool:
    """Whether the grouped GEMMs check their layout / ``masked_m`` (see :func:`set_check_groups`)."""
    return _CHECK_GROUPS.get()


class Op:
    """A public operation: ``name`` and ``schema`` of its torch custom op, the names of the arguments
    it writes, ``check(*args)`` (raises on bad arguments) and ``bind(*args)`` (returns the callable
    that runs checked arguments of that signature)."""

    def __init__(self, name: str, schema: str, mutates: tuple[str, ...], check: Callable[..., None],
                 bind: Callable[..., Callable[..., None]]):
        self.name, self.schema, self.mutates = name, schema, mutates
        self._check, self._bind = check, bind
        self._calls = PlanCache()
        OPS.append(self)

    def __call__(self, *args: object) -> None:
        if torch.compiler.is_compiling():
            getattr(torch.ops.moegemm, self.name)(*args)
        else:
            self.run(*args)

    def run(self, *args: object) -> None:
        """The eager path, and the custom op's implementation."""
        key = (device.get_pdl(), device.num_sms_override(),
               *[(x.dtype, x.shape, x.stride(), x.device) if isinstance(x, Tensor) else x for x in args])
        try:
            call = self._calls.lookup(key)
        except TypeError:  # an unhashable argument (a list, say): the check names it
            key, call = None, PlanCache.MISSING
        if call is PlanCache.MISSING:
            self._check(*args)
            call = self._bind(*args)
            if key is not None:
                self._calls.store(key, call)
        call(*args)


OPS: list[Op] = []


def _writes_only_outputs(*args: object) -> None:
    """The ops' fake (meta) implementation: they return nothing and write their outputs in place."""
    return None


def register_custom_ops() -> None:
    """Register every Op as ``torch.ops.moegemm.<name>`` (once, at import of moegemm)."""
    for op in OPS:
        custom = torch.library.custom_op(f"moegemm::{op.name}", op.run, mutates_args=op.mutates, schema=op.schema)
        custom.register_fake(_writes_only_outputs)
