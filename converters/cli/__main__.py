"""``python -m keras_bn.converters.cli``: the same as ``keras-bn``."""

from keras_bn.converters.cli import console_main

console_main()
