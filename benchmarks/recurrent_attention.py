"""Native export of recurrent and attention models users write, judged against float64.

For each model of the test suite's users' models (tests/test_onnx_recurrent.py and
tests/test_onnx_attention.py: Embedding -> Bidirectional(LSTM) -> Dense, a masked
GRU classifier with a BatchNormalization, a Transformer encoder block with
BatchNormalization after its Dense layers), randomized weights: export natively
(``fold=True``, dynamic batch), run onnxruntime at batch 1 and 8, and report the
export's success, ONNX node count, its error against a float64 run of the model
next to Keras float32's own (``max |y - exact| / max |exact|``, the worst output and
batch), and the export time. Usage::

    python benchmarks/recurrent_attention.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import keras  # noqa: E402
from support.checks import export_and_judge  # noqa: E402
from support.models import randomize_batch_norms  # noqa: E402
from test_onnx_attention import _floats, _randomized, transformer_encoder  # noqa: E402
from test_onnx_recurrent import (  # noqa: E402
    _sequences,
    _weights_of_every_size,
    embedding_bidirectional_lstm,
    masked_gru_classifier,
    token_ids,
)

MODELS = {
    "Embedding -> Bidirectional(LSTM) -> Dense": (
        lambda: _weights_of_every_size(embedding_bidirectional_lstm()),
        token_ids,
    ),
    "Masking -> GRU -> GRU -> Dense+BN (classifier)": (
        lambda: randomize_batch_norms(_weights_of_every_size(masked_gru_classifier())),
        lambda batch: _sequences(batch, padded=True),
    ),
    "Transformer encoder (MHA, LayerNorm, Dense+BN)": (
        lambda: randomize_batch_norms(_randomized(transformer_encoder())),
        _floats((5, 16)),
    ),
}


def main() -> None:
    warnings.simplefilter("ignore")
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}")
    print(
        "| model | native export | ONNX nodes | ops | error vs float64: ONNX | Keras float32 | export s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (build, make_inputs) in MODELS.items():
        model = build()
        with tempfile.TemporaryDirectory() as directory:
            start = time.perf_counter()
            try:
                result, judged = export_and_judge(
                    model,
                    make_inputs,
                    Path(directory) / "model.onnx",
                    batch_sizes=(1, 8),
                    fold=True,
                )
            except Exception as error:  # report, keep going
                print(f"| {name} | failed: {str(error).splitlines()[0][:80]} | | | | | |")
                continue
            seconds = time.perf_counter() - start
        ops = ", ".join(
            f"{op} {count}"
            for op, count in sorted(result.op_counts.items())
            if op in ("LSTM", "GRU", "RNN", "MatMul", "Softmax", "Transpose")
        )
        onnx_error = max(c.exact_error for c in judged)
        keras_error = max(c.keras_exact_error for c in judged)
        print(
            f"| {name} | yes | {result.node_count} | {ops} | {onnx_error:.2g} | "
            f"{keras_error:.2g} | {seconds:.2f} |"
        )


if __name__ == "__main__":
    main()
