"""The projector: consumes events from JetStream and applies them to the read database."""
