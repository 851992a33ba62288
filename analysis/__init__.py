"""The analysis of finished runs: ``kernels`` (one checkpoint, array, record or picture), ``compare`` (many
runs: table, statistics across seeds, figures, HTML report), ``dashboard`` (a live W&B report).
Run them as ``python -m analysis.compare ...`` or ``python analysis/compare.py ...``."""
