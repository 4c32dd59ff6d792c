"""The earlier name of :mod:`recsys.retrieval`, kept so that code written against it still runs.

Retrieval moved below both sides: the export step builds an index as it writes an export, and
serving searches it.
"""

from recsys.retrieval import *  # noqa: F403
from recsys.retrieval import __all__  # noqa: F401
