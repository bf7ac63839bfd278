"""The live pipeline dashboard at /dashboard: one page, fed by one server-sent event stream."""
