"""``python -m serving.candidates``: the help at once, else the job with its log lines on the console."""

import sys

from recsys.console import help_asked
from serving.candidates import __doc__ as OVERVIEW
from serving.cli import candidates_parser

if help_asked(sys.argv[1:]):  # answered before torch is imported (seconds)
    candidates_parser(OVERVIEW).parse_args()

# the imports below take seconds (torch), so the help comes first
import logging  # noqa: E402

from serving.candidates.command import main  # noqa: E402

# force: importing torchrec (through fbgemm_gpu) calls logging.info, which installs a
# WARNING-level root handler that would swallow this job's INFO lines
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports every CPU variant it tries
sys.exit(main())
