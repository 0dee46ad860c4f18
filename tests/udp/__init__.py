"""UDP acceptance tests: real DNS through the proxy, endpoint moves, ICMP errors, a bounded
session table under load, per-client fairness and the UDP metrics."""
