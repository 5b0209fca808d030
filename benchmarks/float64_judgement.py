"""The float64 judgement's cost: ``keras-bn`` with the float64 twin as it is, or as before.

Usage (whole processes, one command each; BENCHMARKS.md section 15)::

    python benchmarks/float64_judgement.py make effnet.keras
    KERAS_BACKEND=jax python benchmarks/float64_judgement.py -- export effnet.keras -o e.onnx --force
    KERAS_BACKEND=jax python benchmarks/float64_judgement.py --before -- export effnet.keras ...

``--before`` runs the twin as keras-bn did before issue 24 item 1: every layer's own
float64 kernel (no depthwise convolution as a sum over taps) and an eager pass (no
compiled program). Everything after ``--`` is the ``keras-bn`` command line.
"""

import sys
from pathlib import Path


def make(path: str) -> None:
    """EfficientNetB0 (weights=None, 128 px, no top: its 4x4x1280 features) with BN
    statistics randomized wide enough (gains 0.3..3) that Keras float32 is ~1e-3 of the
    range off float64: the outright check fails and the float64 judgement runs."""
    import keras

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.models import randomize_batch_norms

    model = keras.applications.EfficientNetB0(
        weights=None, input_shape=(128, 128, 3), include_top=False
    )
    randomize_batch_norms(model, gain=(0.3, 3.0))
    model.save(path)


def main(argv: list[str]) -> int:
    if argv[:1] == ["make"]:
        make(argv[1])
        return 0
    before = "--before" in argv[: argv.index("--")] if "--" in argv else False
    command = argv[argv.index("--") + 1 :] if "--" in argv else argv
    from keras_bn.converters.cli import main as keras_bn

    if before:
        from keras_bn.converters import float64_kernels, reference

        float64_kernels.TWIN_LAYERS.clear()

        def eager(self, structure):  # Float64Twin.__call__ then runs the model eagerly
            raise RuntimeError("the eager pass, as before")

        reference.Float64Twin._compiled = eager
    return keras_bn(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
