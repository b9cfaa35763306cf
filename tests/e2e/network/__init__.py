"""The network between client and host: bastions (ProxyJump), link outages, faults."""
