"""The suite runs with --import-mode=importlib; put this folder on sys.path for the shared _tiny."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
