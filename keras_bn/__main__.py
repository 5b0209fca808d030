"""``python -m keras_bn``: the keras-bn command line (same as the ``keras-bn`` script).

The converter is imported only here, when run as a program, so ``import keras_bn``
never imports the converter, onnx or onnxruntime.
"""

if __name__ == "__main__":
    from keras_bn.converters.cli import console_main

    console_main()
