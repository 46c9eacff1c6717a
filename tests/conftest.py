"""Shared by every test environment: the folder itself on ``sys.path``, so that test modules can
import the helpers that live here (``path_probes``) whichever subfolder pytest runs."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
