"""Signed webhooks: endpoints, a durable outbox in the job database, and the delivery worker."""
