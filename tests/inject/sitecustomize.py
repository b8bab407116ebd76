"""Run at start-up by every Python process that has this folder on PYTHONPATH: with $SAEFLOW_FAIL_STAGE
set, that pipeline stage fails as it starts (tests/failing_stage.py)."""

import os
import sys
from pathlib import Path

if os.environ.get("SAEFLOW_FAIL_STAGE"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import failing_stage

    failing_stage.install(os.environ["SAEFLOW_FAIL_STAGE"])
