"""User backends plugged in by import path (``plugins.wrong:drop_last_key``) in the harness tests.
pytest puts tests/ on sys.path (tests/conftest.py is a rootdir conftest without __init__.py), and
the subprocess tests set PYTHONPATH to it."""
