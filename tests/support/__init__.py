"""Support shared by the test modules (and, by path, by benchmarks/).

Test modules import from here, never from each other: ``from support.models import
...`` (pyproject's pytest ``pythonpath`` puts ``tests/`` on ``sys.path``; the
subprocess scripts of folding/test_folding.py and onnx/test_onnx_export.py insert it
themselves). No pytest import, so the benchmarks can use these modules too.

- models.py: walking models, non-trivial BatchNormalization statistics, small models.
- checks.py: running models, float64 references, folding checked end to end, native
  export judged against float64.
- faults.py: classic converter bugs injected into ONNX files (float and QDQ int8).
- files.py: digests and zip archives.
- console.py: the installed ``keras-bn`` script run as a user runs it.
- keras_hub_zoo.py: small KerasHub models as a table of constructor arguments.
- depthwise_1d.py: a depthwise 1-D network trained on digits as sequences (int8).
"""
