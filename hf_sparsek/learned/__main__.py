"""``python -m hf_sparsek.learned``: the same as ``hf-sparsek distill``."""

import sys

from .cli import main

sys.exit(main())
