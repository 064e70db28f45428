"""``egressproxy demo``: a throwaway TLS PostgreSQL with the proxy in front of it.

The package is the command's product code, split by job: ``certs`` (a CA and
the database's certificate, made at run time), ``pgcluster`` (the PostgreSQL
server: find, initdb, start, stop), ``configtext`` (the ports and the YAML the
proxy runs), ``banner`` (the commands printed for the user to try) and
``runner`` (the order of it all, signals and clean-up).  Nothing here is used
by the proxy itself.
"""
