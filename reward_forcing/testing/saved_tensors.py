"""The peak bytes autograd keeps for backward, measured with saved-tensor hooks (tests/test_memory_plan.py,
scripts/measure_activations.py).

Every tensor autograd saves passes the pack hook; it is wrapped in a holder whose lifetime is the saved tensor's
(autograd frees it after the node's backward, or with the graph), so the live bytes rise on pack and fall when the
last holder of a storage goes. A storage saved several times counts once; parameters do not count.
Activation checkpointing saves through its own hooks: inside a checkpointed region only the region's inputs reach
these hooks (its recomputation is measured by running one region without checkpointing).
"""
import weakref
from collections import Counter

import torch


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedTensorPeak:
    """`with SavedTensorPeak() as meter: ...` -> meter.peak, the most bytes saved for backward at once."""

    def __init__(self):
        self.holders, self.live, self.peak = Counter(), 0, 0

    def _pack(self, tensor):
        if isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter):
            return tensor  # a weight (FSDP registers its gathered parameters as Parameters too), or a view of one
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0:
            return tensor
        held = _Held(tensor)
        if self.holders[key] == 0:
            self.live += size
            self.peak = max(self.peak, self.live)
        self.holders[key] += 1
        weakref.finalize(held, self._release, key, size)
        return held

    def _release(self, key, size):
        self.holders[key] -= 1
        if self.holders[key] == 0:
            self.live -= size

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
