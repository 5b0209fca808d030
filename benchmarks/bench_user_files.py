"""What the guarded door for user files costs, and how fast it refuses hostile ones.

1. The checks of a genuine file next to the work they guard: ``check_keras_file``
   (zip container, CRCs, config sizes) against ``keras.saving.load_model`` of the
   same file, and ``load_onnx`` (size, tensors, inputs, external data) against
   creating an onnxruntime session, for Keras Applications models (weights=None).
2. Hostile files refused before anything is allocated: a Dense layer declaring
   10^10 units, a 2 GiB zip bomb member, an ``.npz`` header declaring a 4 TB array,
   an ONNX tensor declaring 10^12 values; time and peak memory growth of each refusal.

Usage::

    python benchmarks/bench_user_files.py --models ResNet50 MobileNetV2 --repeat 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _best(function, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def genuine(models: list[str], repeat: int, directory: Path) -> list[dict]:
    import keras
    import onnxruntime as ort

    from keras_bn.converters.onnx.export import export_onnx
    from keras_bn.converters.user_files import check_keras_file, load_onnx

    rows = []
    for name in models:
        model = getattr(keras.applications, name)(weights=None, input_shape=(224, 224, 3))
        keras_path, onnx_path = directory / f"{name}.keras", directory / f"{name}.onnx"
        model.save(keras_path)
        export_onnx(model, onnx_path, fold=True)
        check = _best(lambda: check_keras_file(keras_path), repeat)  # noqa: B023
        load = _best(lambda: keras.saving.load_model(keras_path, compile=False), repeat)  # noqa: B023
        onnx_check = _best(lambda: load_onnx(onnx_path), repeat)  # noqa: B023
        session = _best(
            lambda: ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]),  # noqa: B023
            repeat,
        )
        rows.append(
            {
                "model": name,
                "keras_mib": round(keras_path.stat().st_size / 2**20, 1),
                "check_keras_s": round(check, 3),
                "keras_load_s": round(load, 3),
                "check_onnx_s": round(onnx_check, 3),
                "ort_session_s": round(session, 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def hostile(directory: Path) -> list[dict]:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from keras_bn.converters.errors import UserInputError
    from keras_bn.converters.user_files import check_keras_file, load_onnx, read_npz

    cases = {}
    config = {
        "class_name": "Sequential",
        "config": {
            "layers": [
                {"class_name": "InputLayer", "config": {"batch_shape": [None, 8]}},
                {
                    "class_name": "Dense",
                    "config": {"name": "d", "units": 10**10},
                    "build_config": {"input_shape": [None, 8]},
                },
            ]
        },
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
        archive.writestr("model.weights.h5", b"")
    (directory / "units.keras").write_bytes(buffer.getvalue())
    cases["Dense(10**10 units)"] = lambda: check_keras_file(directory / "units.keras")

    bomb = directory / "bomb.keras"  # 2 GiB of zeros, deflated, streamed to disk
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", json.dumps(config))
        with archive.open("assets/zeros", "w", force_zip64=True) as member:
            block = bytes(64 << 20)
            for _ in range(32):
                member.write(block)
    cases[f"zip bomb ({bomb.stat().st_size / 2**20:.0f} MiB -> 2 GiB)"] = lambda: check_keras_file(
        bomb
    )

    npy = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)}
    np.lib.format.write_array_header_1_0(npy, header)
    with zipfile.ZipFile(directory / "huge.npz", "w") as archive:
        archive.writestr("x.npy", npy.getvalue() + bytes(64))
    cases[".npz header of 4 TB"] = lambda: read_npz(directory / "huge.npz")

    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[10**6, 10**6])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 10**6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10**6])],
        [weight],
    )
    onnx.save(helper.make_model(graph), directory / "huge.onnx")
    cases["ONNX tensor of 10**12 values"] = lambda: load_onnx(directory / "huge.onnx")

    rows = []
    for name, case in cases.items():
        before = _peak_mib()
        start = time.perf_counter()
        try:
            case()
            message = "ACCEPTED"
        except UserInputError as error:
            message = str(error)[:90]
        rows.append(
            {
                "case": name,
                "seconds": round(time.perf_counter() - start, 4),
                "peak_growth_mib": round(_peak_mib() - before, 1),
                "message": message,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ResNet50", "MobileNetV2"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        refused = hostile(Path(directory))  # first: peak memory not yet raised by Keras
        checked = genuine(args.models, args.repeat, Path(directory))
    ratios = [row["check_keras_s"] / row["keras_load_s"] for row in checked]
    print(json.dumps({"refused": refused, "genuine": checked}, indent=1))
    print(f"median check/load ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
