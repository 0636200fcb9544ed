"""``python -m hf_sparsek.finetune`` (and ``accelerate launch -m hf_sparsek.finetune``): same as ``hf-sparsek
finetune``."""

import sys

from hf_sparsek.finetune.cli import main

sys.exit(main())
