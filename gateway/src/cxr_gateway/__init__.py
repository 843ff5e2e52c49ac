"""cxr gateway: `gateway/kong.yml` (Kong 3.x DB-less) validated by a typed model, and a local
development stand-in for Kong that reads the same file and enforces the same rules."""
