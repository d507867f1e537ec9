"""RolePlayProj benchmark: `python bench/run.py --help` (writes bench/results.md)."""
