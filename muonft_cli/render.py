"""Everything muonft shows a person: rich tables, progress bars and console lines, for every command.

Engine modules (train, evaluate, diagnose, sweep) return data and report progress through callbacks or sinks;
only this module (called from `cli.py`) turns that data into text on the console. A Python user of the engine
therefore gets no console output they did not ask for. Talk goes to stderr; data (`--json`) to stdout.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------ training (sinks)

# ------------------------------------------------------------------------------------------------ eval

# -------------------------------------------------------------------------------------------- diagnose

# ----------------------------------------------------------------------------------------------- sweep
