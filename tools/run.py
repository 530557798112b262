#!/usr/bin/env python
"""Run an mmexit recipe: ``accelerate launch tools/run.py RECIPE [key=value ...]``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmexit.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
