"""The machinery's tests, one file per module; `python -m unittest test_core` runs them after the method's."""
