"""The read side: QueryService over the read database, with read-your-writes waits and live watches."""
