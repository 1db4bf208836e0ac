"""ember on a Ray cluster: each host's daemon joins Ray as a node and advertises what it may
give sandboxes as Ray resources (docs/cluster.md).

Ray is an optional extra (``pip install ember[cluster]``): nothing here imports it at
module level, and only :mod:`ember.cluster.nodes` imports it at all, inside its functions.
Ray's node table is the membership; ember keeps no list of its own. What a home records is
which cluster it joined (:mod:`ember.cluster.record`), so that its daemon can say so.
"""

from __future__ import annotations

from ember.cluster.advertise import Advertisement, detect_advertisement
from ember.cluster.record import ClusterRecord, clear_record, load_record, save_record

__all__ = [
    "Advertisement",
    "ClusterRecord",
    "clear_record",
    "detect_advertisement",
    "load_record",
    "save_record",
]
