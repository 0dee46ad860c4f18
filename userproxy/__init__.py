"""userproxy: a userspace TCP/UDP service proxy that does the job of kube-proxy.

Reading it to learn how a service proxy works?  Follow the data in the order it flows:
``model`` (the vocabulary), ``control/`` (handlers -> trackers -> runner -> proxier ->
plan), ``effects`` (what a sync changes on the host), ``dataplane/`` (listeners, dial,
relay, UDP sessions), then ``sources/`` (the Kubernetes API and manifest files) and
``proxy`` (the wiring).  docs/reading-order.md gives each stop, the upstream kube-proxy or
client-go file it mirrors, and the tests to read beside it.
"""

from __future__ import annotations

__version__ = "0.1.0"
