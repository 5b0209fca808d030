"""Native ONNX export of Keras models.

:mod:`.layout` (which Keras axis each ONNX axis holds), :mod:`.builder` (the
builder rules write through), :mod:`.rules` (one rule per layer class, by
family, and the table), :mod:`.export` (the driver, :func:`~.export.export_onnx`,
and the structural checks), :mod:`.writing` (onnx.checker and the file, weights
spliced in as it is written), :mod:`.metadata` (what the file records for
validation). Nothing is imported here, so :mod:`.metadata` and :mod:`.layout`
stay cheap for readers of exported files.
"""
