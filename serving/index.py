"""Former home of the faiss layer, now :mod:`serving.retrieval.faiss_index`; this name is an alias.

``import serving.index`` gives that very module (not a copy of its names), so code that patches
``serving.index.save_index`` (tests/test_reliability.py) patches what exports call. Delete this
file once nothing imports ``serving.index``. Exact search, the funnel and recall moved to
:mod:`serving.retrieval` (``torch_topk``, ``FunnelSpec``, ``FunnelRetriever``, ``recall_at_k``).
"""

import sys

from serving.retrieval import faiss_index

sys.modules[__name__] = faiss_index
