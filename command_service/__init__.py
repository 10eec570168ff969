"""The write side: CommandService over the write database, with the transactional outbox and its relay."""
