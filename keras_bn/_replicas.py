"""Data-parallel forward passes for recalibration, on the engines' own distribution APIs.

Recalibration runs the model eagerly with hooks on the BN layers. Under a
distribution, each batch is split over the replicas by the engine, each replica's
share of every BN input is reduced to float64 ``(count, mean, m2)`` on its host
(:class:`keras_bn.running_moments.RunningMoments`), and the hosts' moments are
merged with Chan's formula (weighted by counts, never averaged), so the result
is the single-process one:

- JAX, ``keras.distribution`` (e.g. ``DataParallel``): each batch is placed with
  the distribution's data layout (``keras.distribution.distribute_tensor``), the
  model runs SPMD over the devices, and every addressable shard of a BN input is
  reduced where it lies; across processes (``jax.distributed``) the per-process
  moments are gathered with ``multihost_utils.process_allgather``.
- TensorFlow, a ``tf.distribute`` strategy (the model's ``distribute_strategy``):
  each batch is split over the replicas
  (``experimental_distribute_values_from_function``) and the model runs per
  replica in ``strategy.run``; across workers the per-worker moments are gathered
  with ``strategy.gather``.

Every host is given the same data; each replica takes its slice of each batch.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import tree

from keras_bn._batch_norm_state import to_numpy
from keras_bn.running_moments import RunningMoments


class Replicas:
    """The replicas a model's forward passes run on (one when not distributed)."""

    def __init__(self, model):
        self.kind = "local"
        self.strategy: Any = None
        self.distribution: Any = None
        backend = keras.backend.backend()
        if backend == "jax":
            distribution = keras.distribution.distribution()
            if distribution is not None and len(distribution.device_mesh.devices.ravel()) > 1:
                self.kind, self.distribution = "jax", distribution
        elif backend == "tensorflow":
            strategy = getattr(model, "distribute_strategy", None)
            if strategy is not None and strategy.num_replicas_in_sync > 1:
                self.kind, self.strategy = "tensorflow", strategy

    # ------------------------------------------------------------- running

    def run(self, forward, x) -> None:
        """Calls ``forward(x)`` once, with ``x`` split over the replicas."""
        if self.kind == "jax":
            size = len(tree.flatten(x)[0])
            devices = self.distribution.device_mesh.devices.size
            whole = size - size % devices  # JAX shards evenly: the rest runs unsharded
            if whole:
                forward(tree.map_structure(lambda a: self._place(a[:whole]), x))
            if whole < size and _process_index() == 0:  # counted by one process
                forward(tree.map_structure(lambda a: a[whole:], x))
        elif self.kind == "tensorflow":
            strategy = self.strategy

            def part(context):
                count = context.num_replicas_in_sync
                index = context.replica_id_in_sync_group
                return tree.map_structure(lambda a: np.array_split(np.asarray(a), count)[index], x)

            strategy.run(
                forward, args=(strategy.experimental_distribute_values_from_function(part),)
            )
        else:
            forward(x)

    def _place(self, array):
        layout = self.distribution.get_data_layout(array.shape)
        return keras.distribution.distribute_tensor(array, layout)

    @staticmethod
    def pieces(inputs, mask):
        """The NumPy ``(values, mask)`` of a BN input, one piece per device holding part of it."""
        shards = getattr(inputs, "addressable_shards", None)
        if shards is None or len(shards) < 2:  # not a sharded jax.Array
            yield to_numpy(inputs), None if mask is None else to_numpy(mask)
            return
        mask_shards = {}
        if mask is not None and hasattr(mask, "addressable_shards"):
            mask_shards = {shard.device: shard for shard in mask.addressable_shards}
        for shard in shards:
            if shard.replica_id != 0:  # a copy of a piece already counted
                continue
            piece_mask = None
            if mask is not None:
                own = mask_shards.get(shard.device)
                if own is not None and own.index[:1] == shard.index[:1]:
                    piece_mask = np.asarray(own.data)
                else:
                    piece_mask = to_numpy(mask)[shard.index[0]]
            yield np.asarray(shard.data), piece_mask

    # ------------------------------------------------------------- merging

    def merge_hosts(self, moments: RunningMoments) -> RunningMoments:
        """This host's moments merged with every other host's (Chan's formula)."""
        packed = np.stack([moments.count, moments.mean, moments.m2])
        if self.kind == "jax":
            import jax

            if jax.process_count() == 1:
                return moments
            from jax.experimental import multihost_utils

            with jax.enable_x64(True):  # float64 moments cross hosts as they are
                every = np.asarray(multihost_utils.process_allgather(packed))
        elif self.kind == "tensorflow" and _workers(self.strategy) > 1:
            every = self._gather_workers(packed)
        else:
            return moments
        merged = RunningMoments(moments.shape)
        for count, mean, m2 in every.reshape((-1, *packed.shape)):
            merged.merge(count, mean, m2)
        return merged

    def _gather_workers(self, packed: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        strategy, first = self.strategy, []

        def value(context):  # this worker's moments on its first replica, zeros elsewhere
            first.append(context.replica_id_in_sync_group)
            keep = len(first) == 1
            return tf.constant((packed if keep else np.zeros_like(packed))[None], tf.float64)

        values = strategy.experimental_distribute_values_from_function(value)
        return np.asarray(strategy.gather(values, axis=0))


def replica_id() -> int:
    """The calling replica's index in a ``tf.distribute`` replica context, else 0."""
    if keras.backend.backend() != "tensorflow":
        return 0
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None:
        return 0
    return int(tf.get_static_value(context.replica_id_in_sync_group))


def _process_index() -> int:
    import jax

    return jax.process_index()


def _workers(strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return max(1, sum(len(tasks) for name, tasks in spec.items() if name in ("chief", "worker")))
