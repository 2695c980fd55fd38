import sys
from pathlib import Path

# helpers shared by the test files import by name under any pytest import mode
sys.path.insert(0, str(Path(__file__).parent))
