"""intentflow: Stripe payment webhooks to orders and stock in PostgreSQL, through Kafka.

The repository keeps one folder per part (`consumer/`, `producer/`, `schemas/`, ...);
this package gathers them under one import name (`intentflow.consumer`, ...) so that
the distribution claims no name but its own. The folders here are links to them.
"""
