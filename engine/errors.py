"""The one error type about the user's input.

`EngineError` is the base of every error that is about an input (a file, a flag, a setting) rather than a bug.
Command-line entry points print its message as one line and exit 2 (engine/cli.py `run_main`); everything else
is a bug and keeps its traceback. It lives alone so that every layer, networks and kernels' callers included, can
raise it without importing anything else of the engine.
"""


class EngineError(ValueError):
    """An input the engine cannot use — a file, a flag, a setting — named in the message with what to do."""
