"""python -m towers.reference FIGURE.png: read the paper's Figure 3 once and keep it (towers.reference.build)."""

import json
import sys
from pathlib import Path

from towers.reference import build

if len(sys.argv) != 2:
    sys.exit("usage: python -m towers.reference FIGURE.png  (the paper's Figure 3)")
print(json.dumps(build(Path(sys.argv[1])), indent=1))
