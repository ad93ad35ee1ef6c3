"""The router: profiles and acceptance history in PostgreSQL, chain assignments on NATS."""
