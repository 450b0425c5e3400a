"""PyTorch DDP communication hooks: the layer-wise quantized exchange and layer-wise PowerSGD.

For ``torch.nn.parallel.DistributedDataParallel`` jobs (``torchrun``; gloo on CPU, NCCL on GPU):
two lines give DDP the codec of the Horovod path, and any torch optimizer (QODA included)
steps on the aggregate as usual::

    state = qoda_hvd.ddp.LayerwiseHookState(model=model, bits=4)
    ddp_model.register_comm_hook(state, qoda_hvd.ddp.layerwise_hook)

- :func:`layerwise_hook` / :class:`LayerwiseHookState`: per DDP bucket, unbiased layer-wise
  quantization with adapted levels, entropy coding, one allgather of the payloads, the exact
  average of the quantized gradients, bit-identical on every rank (:mod:`.layerwise`).
- :func:`powersgd_hook` / :class:`PowerSGDHookState`: PowerSGD with error feedback and warm
  start, one rank or per-type ranks by L-GreCo's DP (``layerwise=True``) (:mod:`.powersgd`).

Both states pickle like torch's ``PowerSGDState`` (without the process group; call
``state.bind(model)`` after loading) and report ``compression_stats()``. Both work with
``gradient_as_bucket_view=True``, ``static_graph=True``, ``no_sync()`` (the hooks run at the
synchronising step only) and any ``bucket_cap_mb``. Nothing here imports Horovod or mpi4py:
only ``torch.distributed``.
"""
from __future__ import annotations

from qoda_hvd.ddp._base import CompressionStats
from qoda_hvd.ddp.layerwise import HookStats, LayerwiseHookState, layerwise_hook
from qoda_hvd.ddp.powersgd import PowerSGDHookState, PowerSGDHookStats, powersgd_hook

__all__ = ["CompressionStats", "HookStats", "LayerwiseHookState", "PowerSGDHookState",
           "PowerSGDHookStats", "layerwise_hook", "powersgd_hook"]
