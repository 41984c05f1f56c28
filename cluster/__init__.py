"""The cluster on Ray: node actors, the controller, the Arrow Flight data plane, and the client."""
