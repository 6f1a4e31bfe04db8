"""What backup and restore share about each engine: the Redis wire protocol (redis_wire) and RDB
format (rdb), running PostgreSQL's tools (pg_tools) and reading a plain SQL dump (sql_dump)."""
