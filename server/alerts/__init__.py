"""Alert lifecycle, outbox and notifiers."""
