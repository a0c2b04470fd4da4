"""The ext_proc unit tests' helper module (`extproc_client`) imports the same way under every
pytest import mode: this directory goes on sys.path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
