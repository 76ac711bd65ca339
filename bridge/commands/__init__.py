"""`callbridge` command groups that live outside bridge/cli.py (one module per group)."""
