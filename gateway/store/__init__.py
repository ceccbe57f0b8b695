"""Store: durable instance files and their SQL index."""
