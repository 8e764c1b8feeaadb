"""``python tests/signal_while_scoring.py fit|score ...``: the command line of ``python -m rmt_lightning``, with every
entropy shard this process scores logged to ``$RMT_TEST_SCORED_LOG`` (one line ``rank shard-size``) and, when
``$RMT_TEST_SIGNAL_AFTER`` is set, SIGTERM sent to this process once it has scored that many shards (on rank
``$RMT_TEST_SIGNAL_RANK`` only), as a scheduler would. A script file rather than ``python -c``: Lightning's
DDP launcher starts the other processes by running the same command again."""

import os
import signal

from rmt_lightning.__main__ import main
from rmt_lightning.data import entropy_shards

_score_entropy = entropy_shards.score_entropy
_scored = 0


def _logged_score_entropy(model, documents, **kwargs):
    global _scored
    result = _score_entropy(model, documents, **kwargs)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    with open(os.environ["RMT_TEST_SCORED_LOG"], "a") as log:
        log.write(f"{rank} {sum(len(d) for d in documents)}\n")
    _scored += 1
    after = os.environ.get("RMT_TEST_SIGNAL_AFTER")
    if after is not None and _scored == int(after) and rank == int(os.environ.get("RMT_TEST_SIGNAL_RANK", "0")):
        os.kill(os.getpid(), signal.SIGTERM)
    return result


entropy_shards.score_entropy = _logged_score_entropy

if __name__ == "__main__":
    main()
