"""`keras_bn.BatchNormalization`: the stock Keras layer plus what users miss."""

import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_bn import _moments


@keras.saving.register_keras_serializable(package="keras_bn")
class BatchNormalization(keras.layers.BatchNormalization):
    """Layer that normalizes its inputs, a drop-in `keras.layers.BatchNormalization`.

    Every argument and behaviour of the stock layer is kept (renorm,
    `synchronized`, masking, regularizers, constraints, mixed precision,
    `trainable=False` meaning inference mode) and the weights keep their stock
    names (`gamma`, `beta`, `moving_mean`, `moving_variance`). On top of it:
    several normalized axes, a cumulative moving average (`momentum=None`),
    unbiased moving variance, ghost batches (`virtual_batch_size`), a
    fine-tuning mode (`freeze_statistics=True`), numerically stable moments on
    every backend and path, masks for any axis (also with `synchronized`), a
    stated policy for degenerate batches, moving statistics averaged over
    replicas under `tf.distribute`, and `inference_affine()` for converters.

    With batch statistics (training), for each channel (each combination of
    indices along `axis`):

        y = gamma * (x - mean(x)) / sqrt(var(x) + epsilon) + beta

    where `mean` and the biased `var` are taken over the batch and every axis
    not in `axis`. With moving statistics (inference):

        y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta
          = x * scale + offset        (see `inference_affine()`)

    Each training step updates the moving statistics:

        moving_mean     = moving_mean * momentum + mean(x) * (1 - momentum)
        moving_variance = moving_variance * momentum + v * (1 - momentum)

    with `v = var(x)`, or `v = var(x) * m / (m - 1)` (Bessel's correction, `m`
    values per channel) when `unbiased_moving_variance=True`. With
    `momentum=None`, the n-th update uses `momentum = (n - 1) / n`, so the
    moving statistics are the plain average over all batches seen.

    Training and inference switching:

    | Call                                 | Normalizes with   | Updates moving | gamma/beta |
    |--------------------------------------|-------------------|----------------|------------|
    | `training=True` (`fit`)              | batch statistics  | yes            | trained    |
    | `training=False`/`None` (`predict`)  | moving statistics | no             | -          |
    | `trainable=False`, any `training`    | moving statistics | no             | frozen     |
    | `freeze_statistics=True`, `training=True` | moving statistics | no        | trained    |
    | `freeze_statistics=True`, `training=False` | moving statistics | no       | -          |

    `freeze_statistics=True` is the fine-tuning mode of torchvision's
    `FrozenBatchNorm2d`: the layer is a fixed per-channel affine map of its
    input followed by trainable gamma and beta, whatever `training` says.
    (`trainable=False` also freezes gamma and beta.) Like `trainable`, change it
    before `compile()`, or compile again.

    Degenerate batches: where a channel has fewer than 2 values in a training
    batch (an empty batch, a batch of one sample for a `Dense` output, a ghost
    batch or a masked batch with at most one unmasked value), batch variance
    carries no information (the stock layer then outputs `beta` for any input,
    or NaN moving statistics for an empty batch). This layer normalizes those
    channels with the moving statistics, as in inference, and leaves their
    moving statistics unchanged; the `momentum=None` batch count advances
    when any channel is updated. (A mask in Keras's convention can leave
    different values out of different channels: validity is per channel.)

    Numerics: batch moments are two-pass (mean, then squared deviations from
    it, which also correct the mean's rounding) on every backend and path,
    including `synchronized=True` and masks. The stock layer's one-pass
    E[x^2] - E[x]^2 (torch and numpy backends, TensorFlow `synchronized=True`)
    returns negative or zero variances, hence NaN outputs, for float32 inputs
    with mean 1e3 and std 1e-2; its TensorFlow float32 mean drifts by whole
    standard deviations over ~1e5 values per channel. Inputs in float16 or
    bfloat16 are normalized in float32, as in the stock layer.

    Correspondence with PyTorch's `torch.nn.BatchNorm*d`:
    - `torch momentum = 1 - keras momentum` (torch's default 0.1 is Keras's
      0.9; Keras's default is 0.99); torch's `momentum=None` is ours.
    - torch keeps an unbiased running variance: use
      `unbiased_moving_variance=True` to match its training.
    - default epsilon: torch 1e-5, Keras 1e-3. Pass `epsilon=1e-5` when
      loading torch weights.
    - weight, bias, running_mean, running_var, num_batches_tracked are gamma,
      beta, moving_mean, moving_variance and `num_batches_tracked` (the latter
      only exists here with `momentum=None`).
    - torchvision's `FrozenBatchNorm2d` is `freeze_statistics=True`.

    Args:
        axis: Integer or list/tuple of integers, the axis or axes that keep
            their own statistics (typically the features axis: `-1`, or `1`
            after a `channels_first` convolution). With several axes,
            statistics (and the weights, shaped like the input along those
            axes, in increasing axis order) exist per combination of indices.
            Negative values count from the end; the batch axis, duplicates and
            out-of-range axes are rejected.
        momentum: Float in [0, 1], momentum of the moving averages; or `None`
            for a cumulative moving average (every batch weighted equally),
            which adds a saved non-trainable int32 variable
            `num_batches_tracked`.
        epsilon: Float > 0 added to the variance to avoid dividing by zero.
        center: If `True`, add the offset `beta`.
        scale: If `True`, multiply by `gamma`.
        beta_initializer: Initializer for the beta weight.
        gamma_initializer: Initializer for the gamma weight.
        moving_mean_initializer: Initializer for the moving mean.
        moving_variance_initializer: Initializer for the moving variance.
        beta_regularizer: Optional regularizer for the beta weight.
        gamma_regularizer: Optional regularizer for the gamma weight.
        beta_constraint: Optional constraint for the beta weight.
        gamma_constraint: Optional constraint for the gamma weight.
        synchronized: TensorFlow backend only. If `True`, batch statistics
            are the global batch's, all-reduced over the replicas of a
            `tf.distribute` strategy at each training step (masks included).
            If `False`, each replica normalizes with its own statistics and
            the moving statistics become the mean of the replicas' updates.
            (With `keras.distribution.DataParallel` on JAX, statistics are
            always the global batch's.)
        renorm: Whether to use Batch Renormalization
            (https://arxiv.org/abs/1702.03275), as in the stock layer.
        renorm_clipping: Dictionary with optional keys `"rmax"`, `"rmin"`,
            `"dmax"` clipping the renorm correction, as in the stock layer.
        renorm_momentum: Float in [0, 1], momentum of the renorm statistics.
        unbiased_moving_variance: If `True`, the moving variance is updated
            with the unbiased batch variance `var * m / (m - 1)` (`m` values
            per channel, over the global batch when synchronized), as in the
            original paper's inference rule and PyTorch. Training-time
            normalization stays biased.
        virtual_batch_size: Optional positive integer. Ghost batch
            normalization: during training, each run of `virtual_batch_size`
            consecutive samples is normalized with its own statistics (shared
            gamma, beta and moving statistics); the moving statistics are
            updated once per step with the average of the ghost batches'
            statistics. The batch size must be a multiple of it. Inference is
            unchanged. (tf.keras 2 took every G-th sample into a ghost batch;
            for shuffled data this makes no difference.) Cannot be combined
            with `synchronized=True`.
        freeze_statistics: If `True`, always normalize with the moving
            statistics and never update them, even with `training=True`,
            while gamma and beta stay trainable (see the table above).
        **kwargs: Base layer keyword arguments (e.g. `name` and `dtype`).

    Call arguments:
        inputs: Input tensor of any rank >= 2.
        training: Python boolean, `True` for batch statistics (see the table).
        mask: Optional boolean tensor; False entries are left out of the
            batch statistics (outputs are computed everywhere). Two shapes
            are read, in this order:
            1. Keras's convention, as in the stock layer: rank
               `inputs.ndim - 1`, covering the leading axes, so that
               `mask[..., None]` broadcasts to the inputs. E.g. a `Masking`
               mask `(B, T)` for `(B, T, C)` inputs, whatever `axis` is, or
               `(1, T, 1)` for `(B, T, H, C)` inputs.
            2. Otherwise, the input shape without the normalized axes, e.g.
               `(B, T)` for channels-first `(B, C, T)` inputs with `axis=1`
               (where `C != T`), or `(B, W)` for `(B, H, W, C)` inputs with
               `axis=(1, 3)`.
            Sizes of 1 broadcast and unknown sizes count as fitting; where
            both readings fit, Keras's wins. A mask that fits neither raises
            a `ValueError` (in inference too, where the stock layer ignores
            masks).

    Input shape:
        Arbitrary, with known sizes along `axis`.

    Output shape:
        Same shape as input.

    Example:

    >>> import numpy as np
    >>> layer = BatchNormalization(axis=1, momentum=None, epsilon=1e-5)
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (8, 4, 5))
    >>> y = layer(x, training=True)
    >>> scale, offset = layer.inference_affine()
    >>> scale.shape
    (4,)

    Reference:
        - [Ioffe and Szegedy, 2015](https://arxiv.org/abs/1502.03167).
        - [Hoffer et al., 2017](https://arxiv.org/abs/1705.08741) (ghost
          batch normalization).
        - [Ioffe, 2017](https://arxiv.org/abs/1702.03275) (renorm).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        synchronized=False,
        unbiased_moving_variance=False,
        virtual_batch_size=None,
        freeze_statistics=False,
        **kwargs,
    ):
        axis = _validate_axis(axis)
        momentum = _validate_momentum("momentum", momentum, allow_none=True)
        renorm_momentum = _validate_momentum("renorm_momentum", renorm_momentum)
        epsilon = _validate_epsilon(epsilon)
        virtual_batch_size = _validate_virtual_batch_size(virtual_batch_size)
        if virtual_batch_size is not None and synchronized:
            raise ValueError(
                "Invalid arguments for BatchNormalization: virtual_batch_size "
                "(ghost batches, which are per replica) cannot be combined with "
                "synchronized=True (global batch statistics). Pass one of them. "
                f"Received: virtual_batch_size={virtual_batch_size}, "
                f"synchronized={synchronized!r}"
            )
        # The stock constructor stores and checks everything it knows about;
        # the arguments it cannot take (several axes, momentum=None) are set
        # right after.
        super().__init__(
            axis=axis if isinstance(axis, int) else axis[0],
            momentum=0.99 if momentum is None else momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
            renorm=renorm,
            renorm_clipping=renorm_clipping,
            renorm_momentum=renorm_momentum,
            synchronized=synchronized,
            **kwargs,
        )
        self.axis = axis
        self.momentum = momentum
        self.unbiased_moving_variance = bool(unbiased_moving_variance)
        self.virtual_batch_size = virtual_batch_size
        self.freeze_statistics = bool(freeze_statistics)
        self.num_batches_tracked = None
        self._axes = None
        self._broadcast_shape = None

    def build(self, input_shape):
        rank = len(input_shape)
        axes = _normalize_axes(self.axis, rank)
        param_shape = tuple(input_shape[a] for a in axes)
        if any(size is None for size in param_shape):
            raise ValueError(
                "Invalid input shape for BatchNormalization: the normalized "
                f"axes {list(axes)} must have known sizes. Received: "
                f"input_shape={tuple(input_shape)}, axis={self.axis!r}"
            )
        self._axes = axes
        self._reduction_axes = [i for i in range(rank) if i not in axes]
        self._broadcast_shape = [input_shape[i] if i in axes else 1 for i in range(rank)]

        def add_statistic(name, initializer, aggregation="mean"):
            # aggregation="mean": under tf.distribute, replicas' updates of
            # the moving statistics are averaged (the stock "none" keeps
            # replica 0's alone).
            return self.add_weight(
                shape=param_shape,
                name=name,
                initializer=initializer,
                trainable=False,
                autocast=False,
                aggregation=aggregation,
            )

        if self.scale:
            self.gamma = self.add_weight(
                shape=param_shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=param_shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        self.moving_mean = add_statistic("moving_mean", self.moving_mean_initializer)
        self.moving_variance = add_statistic("moving_variance", self.moving_variance_initializer)
        if self.renorm:
            # As in the stock layer: renorm tracks the moving stddev and
            # derives the moving variance from it.
            def stddev_initializer(shape, dtype=None):
                initializer = _clone_initializer(self.moving_variance_initializer)
                return ops.sqrt(initializer(shape, dtype=dtype))

            self.moving_stddev = add_statistic("moving_stddev", stddev_initializer)
            self.renorm_mean = add_statistic(
                "renorm_mean", _clone_initializer(self.moving_mean_initializer)
            )
            self.renorm_stddev = add_statistic("renorm_stddev", stddev_initializer)
        if self.momentum is None:
            self.num_batches_tracked = self.add_weight(
                shape=(),
                name="num_batches_tracked",
                initializer="zeros",
                dtype="int32",
                trainable=False,
                autocast=False,
                aggregation="only_first_replica",
            )
        self.input_spec = keras.layers.InputSpec(ndim=rank, axes={a: input_shape[a] for a in axes})

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            mask = self._expand_mask(mask, inputs)
        # BN overflows easily in float16/bfloat16: compute in float32 or wider.
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        inputs = ops.cast(inputs, dtype)
        if training and self.trainable and not self.freeze_statistics:
            outputs = self._call_with_batch_statistics(inputs, mask)
        else:
            shape = self._broadcast_shape
            outputs = self._normalize(
                inputs,
                self._read(self.moving_mean, dtype, shape),
                self._read(self.moving_variance, dtype, shape),
                self._read(self.gamma, dtype, shape),
                self._read(self.beta, dtype, shape),
            )
        return ops.cast(outputs, self.compute_dtype)

    def get_config(self):
        config = {
            "axis": self.axis if isinstance(self.axis, int) else list(self.axis),
            "unbiased_moving_variance": self.unbiased_moving_variance,
            "virtual_batch_size": self.virtual_batch_size,
            "freeze_statistics": self.freeze_statistics,
        }
        return {**super().get_config(), **config}

    def inference_affine(self):
        """The inference-time map `y = x * scale + offset`, for converters.

        `scale = gamma / sqrt(moving_variance + epsilon)` and
        `offset = beta - moving_mean * scale` (gamma 1 and beta 0 when
        `scale`/`center` is False), computed in float64.

        Returns:
            `(scale, offset)`: float64 NumPy arrays shaped like `moving_mean`
            (one value per channel for a single `axis`).
        """
        if not self.built:
            raise ValueError(
                f"BatchNormalization layer {self.name!r} has no weights yet: "
                "expected a built layer. Call it on data or build it with an "
                "input shape before inference_affine(). Received: built=False"
            )

        def as_float64(variable):
            return np.asarray(ops.convert_to_numpy(variable), dtype=np.float64)

        scale = 1.0 / np.sqrt(as_float64(self.moving_variance) + self.epsilon)
        if self.scale:
            scale = as_float64(self.gamma) * scale
        offset = -as_float64(self.moving_mean) * scale
        if self.center:
            offset = offset + as_float64(self.beta)
        return scale, offset

    # Training-mode computation.

    def _call_with_batch_statistics(self, inputs, mask):
        x = inputs
        dtype = x.dtype
        reduction_axes = self._reduction_axes
        shape = self._broadcast_shape
        ghost = self.virtual_batch_size is not None
        if mask is not None:
            # Full size: counts are taken from the mask itself, and ghost
            # batches split it like the inputs.
            mask = ops.broadcast_to(mask, ops.shape(x))
        if ghost:
            original_shape = ops.shape(inputs)
            x, mask = self._split_ghost_batches(x, mask)
            # Axis 0 now indexes ghost batches, axis 1 the samples in one.
            reduction_axes = [1] + [a + 1 for a in reduction_axes[1:]]
            shape = [1, *shape]

        mean, variance, count = _moments.moments(x, reduction_axes, mask, self.synchronized)
        # `valid`: at least two values per channel. A Python bool when the
        # count is static (the common case costs nothing), else a tensor.
        if isinstance(count, int):
            valid = count >= 2
        else:
            valid = ops.greater_equal(count, 2.0)

        moving_mean = self._read(self.moving_mean, dtype, shape)
        moving_variance = self._read(self.moving_variance, dtype, shape)
        gamma = self._read(self.gamma, dtype, shape)
        beta = self._read(self.beta, dtype, shape)
        if valid is False:
            outputs = self._normalize(x, moving_mean, moving_variance, gamma, beta)
        else:
            if valid is True:
                normalize_mean, normalize_variance = mean, variance
            else:
                normalize_mean = ops.where(valid, mean, moving_mean)
                normalize_variance = ops.where(valid, variance, moving_variance)
            if self.renorm:
                r, d = self._renorm_correction(normalize_mean, normalize_variance, valid, shape)
                gamma, beta = _compose_renorm(r, d, gamma, beta, dtype)
            self._update_moving_statistics(mean, variance, count, valid, ghost)
            outputs = self._normalize(x, normalize_mean, normalize_variance, gamma, beta)
        if ghost:
            outputs = ops.reshape(outputs, original_shape)
        return outputs

    def _normalize(self, x, mean, variance, gamma, beta):
        """gamma * (x - mean) / sqrt(variance + epsilon) + beta, all broadcastable."""
        if len(self._axes) == 1 and len(x.shape) == len(self._broadcast_shape):
            # One axis, no ghost batches: the backend's own kernel, as the
            # stock layer (on TensorFlow without XLA, fewer ops than below).
            def flat(value):
                return None if value is None else ops.reshape(value, (-1,))

            return ops.batch_normalization(
                x,
                flat(mean),
                flat(variance),
                axis=self._axes[0],
                offset=flat(beta),
                scale=flat(gamma),
                epsilon=self.epsilon,
            )
        # (x - mean) * inv rather than x * inv - mean * inv: the latter loses
        # low digits when |mean| >> std.
        inv = ops.rsqrt(variance + self.epsilon)
        if gamma is not None:
            inv = inv * gamma
        outputs = (x - mean) * inv
        if beta is not None:
            outputs = outputs + beta
        return outputs

    def _update_moving_statistics(self, mean, variance, count, valid, ghost):
        dtype = mean.dtype
        mean, variance, moving_variance_update, updated = self._batch_statistics(
            mean, variance, count, valid, ghost
        )
        momentum = self.momentum
        if momentum is None:
            momentum = self._cumulative_momentum(updated, dtype)

        def blend(variable, batch_value, momentum):
            moving = ops.cast(variable, dtype)
            new = moving * momentum + batch_value * (1.0 - momentum)
            if updated is not True:
                new = ops.where(updated, new, moving)
            return new

        if not self.renorm:
            self.moving_mean.assign(blend(self.moving_mean, mean, momentum))
            self.moving_variance.assign(
                blend(self.moving_variance, moving_variance_update, momentum)
            )
            return
        # Renorm (as the stock layer): the renorm statistics follow the
        # biased batch stddev; the moving stddev gives the moving variance.
        stddev = ops.sqrt(variance + self.epsilon)
        self.renorm_mean.assign(blend(self.renorm_mean, mean, self.renorm_momentum))
        self.renorm_stddev.assign(blend(self.renorm_stddev, stddev, self.renorm_momentum))
        self.moving_mean.assign(blend(self.moving_mean, mean, momentum))
        moving_stddev = blend(
            self.moving_stddev, ops.sqrt(moving_variance_update + self.epsilon), momentum
        )
        self.moving_stddev.assign(moving_stddev)
        moving_variance = ops.relu(moving_stddev * moving_stddev - self.epsilon)
        if updated is not True:
            moving_variance = ops.where(
                updated, moving_variance, ops.cast(self.moving_variance, dtype)
            )
        self.moving_variance.assign(moving_variance)

    def _batch_statistics(self, mean, variance, count, valid, ghost):
        """(mean, variance, moving-variance update, updated), shaped like the statistics.

        ``updated`` is True, or per channel whether the batch updates it.
        """
        dtype = mean.dtype
        moving_variance_update = variance
        if self.unbiased_moving_variance:
            if isinstance(count, int):
                moving_variance_update = variance * (count / (count - 1))
            else:
                moving_variance_update = variance * (count / ops.maximum(count - 1.0, 1.0))

        def to_param_shape(value):
            return ops.reshape(value, self.moving_mean.shape)

        # `updated`: True, or per channel (shaped like the statistics)
        # whether the batch has at least two values there. Masks in Keras's
        # convention may leave out different values in different channels.
        if ghost:
            # Average over the valid ghost batches (axis 0). Their number is
            # dynamic in graphs, so this path never relies on static shapes.
            if valid is True:
                weights = None
                num_valid = ops.cast(ops.shape(mean)[0], dtype)
            else:
                weights = ops.cast(ops.broadcast_to(valid, ops.shape(mean)), dtype)
                num_valid = ops.sum(weights, axis=0)

            def average(value):
                total = ops.sum(value if weights is None else value * weights, axis=0)
                return to_param_shape(total / ops.maximum(num_valid, 1.0))

            mean, variance = average(mean), average(variance)
            moving_variance_update = average(moving_variance_update)
            if valid is True:
                updated = True
            else:
                updated = to_param_shape(ops.greater(num_valid, 0.0))
        else:
            mean, variance = to_param_shape(mean), to_param_shape(variance)
            moving_variance_update = to_param_shape(moving_variance_update)
            if valid is True:
                updated = True
            else:
                updated = to_param_shape(ops.broadcast_to(valid, self._broadcast_shape))
        return mean, variance, moving_variance_update, updated

    def _cumulative_momentum(self, updated, dtype):
        """``momentum=None``: the n-th update weighs the batch by 1 / n; counts the batch."""
        # A batch counts when any channel is updated.
        seen = ops.cast(self.num_batches_tracked, dtype)
        if updated is True:
            seen_after = seen + 1.0
        else:
            seen_after = seen + ops.cast(ops.any(updated), dtype)
        momentum = seen / ops.maximum(seen_after, 1.0)
        self.num_batches_tracked.assign(ops.cast(seen_after, "int32"))
        return momentum

    def _renorm_correction(self, mean, variance, valid, shape):
        """Batch renorm's (r, d), broadcastable like `mean`; identity where invalid."""
        dtype = mean.dtype
        stddev = ops.sqrt(variance + self.epsilon)
        renorm_mean = self._read(self.renorm_mean, dtype, shape)
        # Avoid dividing by zero early in training (as the stock layer).
        renorm_stddev = ops.maximum(
            self._read(self.renorm_stddev, dtype, shape), math.sqrt(self.epsilon)
        )
        r = stddev / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        rmin = self.renorm_clipping.get("rmin")
        rmax = self.renorm_clipping.get("rmax")
        dmax = self.renorm_clipping.get("dmax")
        if rmin is not None:
            r = ops.maximum(r, rmin)
        if rmax is not None:
            r = ops.minimum(r, rmax)
        if dmax is not None:
            d = ops.clip(d, -dmax, dmax)
        if valid is not True:
            r = ops.where(valid, r, ops.ones_like(r))
            d = ops.where(valid, d, ops.zeros_like(d))
        return r, d

    # Helpers.

    def _read(self, variable, dtype, shape):
        """`variable` cast to `dtype` and reshaped to broadcast; None stays None."""
        if variable is None:
            return None
        return ops.reshape(ops.cast(variable, dtype), shape)

    def _expand_mask(self, mask, inputs):
        """`mask` as booleans broadcastable to `inputs` (the rule in the class docstring)."""
        new_axes = _moments.mask_axes(tuple(mask.shape), tuple(inputs.shape), self._axes, self.axis)
        mask = ops.cast(mask, "bool")
        for axis in new_axes:  # increasing order keeps positions right
            mask = ops.expand_dims(mask, axis)
        return mask

    def _split_ghost_batches(self, x, mask):
        size = self.virtual_batch_size
        batch = x.shape[0]
        if batch is not None and batch % size:
            raise ValueError(
                "Invalid batch for BatchNormalization: the batch size must be a "
                f"multiple of virtual_batch_size={size}. Received: batch size "
                f"{batch}. Use a batch size multiple of {size} (or "
                "drop_remainder batches)."
            )

        def split(tensor):
            shape = ops.shape(tensor)
            return ops.reshape(tensor, (-1, size, *shape[1:]))

        return split(x), None if mask is None else split(mask)


def _compose_renorm(r, d, gamma, beta, dtype):
    """The scale and offset of `(x_hat * r + d) * gamma + beta`: `(r * gamma, d * gamma + beta)`.

    `r` and `d` are constants for the gradient, as in the renorm paper and the
    stock layer (whose private `_compose_transforms` computes the same). A
    missing `gamma` or `beta` (`scale=False`/`center=False`) counts as 1 or 0.
    """
    r = ops.stop_gradient(r)
    d = ops.stop_gradient(d)
    if gamma is not None:
        scale, offset = ops.multiply(r, gamma), ops.multiply(d, gamma)
    else:
        scale, offset = ops.cast(r, dtype), ops.cast(d, dtype)
    if beta is not None:
        offset = ops.add(offset, beta)
    return scale, offset


def _clone_initializer(initializer):
    """A fresh copy of a Keras initializer (so seeded ones are not reused)."""
    if isinstance(initializer, keras.initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


def _is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _validate_axis(axis):
    """`axis` as an int, or as a list of at least two distinct ints."""
    if isinstance(axis, (list, tuple)):
        axes = list(axis)
    else:
        axes = [axis]
    if not axes or not all(_is_integer(a) for a in axes):
        raise ValueError(
            "Invalid axis for BatchNormalization: expected an integer or a "
            "non-empty list/tuple of integers, e.g. axis=-1 or axis=(1, 3). "
            f"Received: axis={axis!r}"
        )
    axes = [int(a) for a in axes]
    if len(set(axes)) != len(axes):
        raise ValueError(
            "Invalid axis for BatchNormalization: expected distinct axes, "
            f"each listed once. Received: axis={axis!r}"
        )
    if 0 in axes:
        raise ValueError(
            "Invalid axis for BatchNormalization: axis 0 is the batch axis, "
            "which statistics are taken over; expected feature axes such as "
            f"-1 (channels_last) or 1 (channels_first). Received: axis={axis!r}"
        )
    return axes[0] if len(axes) == 1 else axes


def _normalize_axes(axis, rank):
    """Non-negative sorted axes for inputs of `rank`, or a ValueError."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    normalized = [a % rank if -rank <= a < rank else None for a in axes]
    if None in normalized or 0 in normalized or len(set(normalized)) != len(normalized):
        raise ValueError(
            "Invalid axis for BatchNormalization: expected distinct integers in "
            f"[{-rank}, {rank - 1}] for inputs of rank {rank}, not the batch "
            f"axis (0 or {-rank}). Received: axis={axis!r}"
        )
    return tuple(sorted(normalized))


def _validate_momentum(name, momentum, allow_none=False):
    if momentum is None and allow_none:
        return None
    if not _is_real(momentum) or not 0.0 <= float(momentum) <= 1.0:
        expected = "a float in [0, 1]" + (" or None" if allow_none else "")
        hint = " (None: cumulative average)" if allow_none else ""
        raise ValueError(
            f"Invalid {name} for BatchNormalization: expected {expected}{hint}, "
            f"e.g. 0.99; note torch momentum 0.1 is Keras momentum 0.9. "
            f"Received: {name}={momentum!r}"
        )
    return float(momentum)


def _validate_epsilon(epsilon):
    if not _is_real(epsilon) or not (0.0 < float(epsilon) < math.inf):
        raise ValueError(
            "Invalid epsilon for BatchNormalization: expected a finite float > 0, "
            f"e.g. 1e-3 (Keras) or 1e-5 (PyTorch). Received: epsilon={epsilon!r}"
        )
    return float(epsilon)


def _validate_virtual_batch_size(virtual_batch_size):
    if virtual_batch_size is None:
        return None
    if not _is_integer(virtual_batch_size) or virtual_batch_size < 1:
        raise ValueError(
            "Invalid virtual_batch_size for BatchNormalization: expected None "
            "or a positive integer that divides the batch size, e.g. 32. "
            f"Received: virtual_batch_size={virtual_batch_size!r}"
        )
    return int(virtual_batch_size)
