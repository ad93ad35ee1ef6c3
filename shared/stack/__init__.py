"""The local stack behind `make up`: NATS, PostgreSQL and every service as managed processes."""
