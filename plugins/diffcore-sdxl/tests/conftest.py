import sys
from pathlib import Path

# the shared tiny components (sdxl_tiny.py) import by name under any pytest import mode
sys.path.insert(0, str(Path(__file__).parent))
