"""``python -m keras_bn.converters.cli``: the same as ``keras-bn``."""

import sys

from keras_bn.converters.cli import main

sys.exit(main())
