"""``python -m serving.export``: the earlier name of ``python -m recsys.export``, kept so that
commands and code written against it still run.

Exporting reads a trained checkpoint, so it belongs to the training side; serving only reads the
exports it writes.
"""

if __name__ == "__main__":
    import runpy

    runpy.run_module("recsys.export", run_name="__main__", alter_sys=True)
else:
    from recsys.export import *  # noqa: F403
    from recsys.export import __all__  # noqa: F401
