"""The OpenAI-compatible HTTP server (`pipeserve serve`)."""
