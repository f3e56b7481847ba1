"""transformers' internal names that latentforge relies on, and why no public API does the job.

The torchvision notice (``quiet_torchvision_notice``, called by ``trainer.cli.quiet``): transformers 5
logs, once for each image-processor class that diffusers' pipelines import, that torchvision is not
installed and that it falls back to the PIL backend. latentforge never installs torchvision (no
CPU build exists for its torch; see ENVIRONMENT.md) and uses no image processor, so the notice is
noise at every start of a command. transformers has no switch for it short of raising its whole
log level (which would hide warnings that matter too); the notice comes from the logger of the
internal module ``transformers.utils.import_utils``, whose records a filter drops.
"""

from __future__ import annotations

from lf_common.log_filters import drop_log_messages
from lf_common.upstream_contract import PrivateName

ADAPTER = "trainer/cli/transformers_private.py"
IMPORT_UTILS = "transformers.utils.import_utils"
TORCHVISION_NOTICE = "requires torchvision (not installed)"

CONTRACTS = (
    PrivateName("transformers", IMPORT_UTILS, "logger = logging.get_logger(__name__)", ADAPTER, kind="source"),
    PrivateName("transformers", IMPORT_UTILS, TORCHVISION_NOTICE, ADAPTER, kind="source"),
)


def quiet_torchvision_notice() -> None:
    """Drop transformers' "requires torchvision (not installed); falling back to ...Pil" notices."""
    drop_log_messages(IMPORT_UTILS, TORCHVISION_NOTICE)
