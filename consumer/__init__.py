"""The order consumer: Stripe events from Kafka become orders and stock movements in PostgreSQL."""
