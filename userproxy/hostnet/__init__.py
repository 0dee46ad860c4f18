"""Host networking: the host's addresses and which of them NodePorts listen on
(``host_addresses``), the node's addresses kept fresh by a watcher (``node``), and the
service IPs userproxy makes local on its own device (``address_device``,
``--manage-addresses``).  Every netlink call is awaited on the event loop."""
