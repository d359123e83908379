"""Makes the model's solution.py importable whatever directory pytest is started from.

This file is copied, with test_solution.py and CHANGELOG.md, into each demo run's workspace.
"""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
