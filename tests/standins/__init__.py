"""Real stand-ins for the cloud: sshd "TPU workers" on loopback and a local Cloud TPU API server."""
