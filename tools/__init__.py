"""Tools around the method, not the method: tools/bench.py (speed) and tools/report.py (tables and curves across runs)."""
